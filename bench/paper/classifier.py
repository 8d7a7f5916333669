"""The class-conditioning check: a small CNN trained on a data set's real train split.

Its accuracy on generated samples under the labels they were asked for says
whether a fine-tuned model's new class table means the right classes (FID
alone cannot tell: a model drawing the right images under the wrong labels
scores the same FID).

Every fine-tuning method here trains with random horizontal flips
(``TrainingRun`` always flips, and the full/LoRA trainers match it), so a
mirrored digit is in the target distribution. The classifier is trained on
unflipped images (a flip-invariant one would have to tell a 2 from a mirrored
5), and generated samples are scored mirror-tolerantly: a sample counts as
class c when c is the most confident class of the sample or of its mirror.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """[B, 1, 32, 32] in [-1, 1] -> logits [B, num_classes]. ~0.16M parameters, ~2.6M MACs per image."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, 128), nn.ReLU())
        self.out = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.head(self.features(x)))


def train_classifier(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 5, batch_size: int = 32, seed: int = 0
) -> SmallCNN:
    """Adam (lr 1e-3) on x [N, 1, 32, 32], y [N]; fixed seed. Trains on x's device, returned there."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes).to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = order[i : i + batch_size].to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mirror_tolerant: bool = False) -> torch.Tensor:
    """Class of each x [N, 1, 32, 32]; mirror-tolerant: max probability over x and its mirror."""
    model.eval()
    prob = model(x).softmax(-1)
    if mirror_tolerant:
        prob = torch.maximum(prob, model(x.flip(-1)).softmax(-1))
    return prob.argmax(-1)


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mirror_tolerant: bool = False, batch_size: int = 256
) -> float:
    """Fraction of x [N, 1, 32, 32] classified as y [N]."""
    hits = 0
    for i in range(0, x.shape[0], batch_size):
        pred = predict(model, x[i : i + batch_size], mirror_tolerant)
        hits += int((pred == y[i : i + batch_size]).sum())
    return hits / max(1, x.shape[0])
