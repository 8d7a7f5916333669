"""Training learns: a short fine-tune lowers the loss, moves every adapter tensor, keeps the base.

The guard for the gradient path: if any adapted layer (a routing path of the
training Route, the class table, the patch conv) stops passing gradient to its
live tensor, that tensor does not move and this test fails.
"""

from __future__ import annotations

import torch

from core.adapter.layers import Route
from core.adapter.model import CLASS_TABLE, DiffFitDiT
from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.training import VLB_WEIGHT, TrainingData, TrainingRun
from difffit.contract import FinetuneRequest


def _stripes(n_per_class: int = 16) -> TrainingData:
    """A fixed two-class set of 1x8x8 images in [-1, 1]: horizontal vs vertical stripes."""
    g = torch.Generator().manual_seed(7)
    lines = (torch.arange(8) % 2 * 2 - 1).float()  # -1, 1, -1, ...
    horizontal = lines[:, None].expand(8, 8)
    x = torch.stack([horizontal] * n_per_class + [horizontal.T] * n_per_class)[:, None]
    x = (x * 0.8 + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    labels = torch.tensor([0] * n_per_class + [1] * n_per_class)
    return TrainingData(x=x, labels=labels, class_names=["horizontal", "vertical"])


@torch.no_grad()
def _eval_loss(model, diffusion, data, params) -> float:
    """The training objective on one fixed batch (fixed t and noise), with the live adapter."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, diffusion.num_timesteps, (data.x.shape[0],), generator=g)
    noise = torch.randn(data.x.shape, generator=g)
    x_t = diffusion.q_sample(data.x, t, noise)
    out = model(x_t, t, data.labels, Route.training(params))
    return float(diffusion.training_losses(out, data.x, x_t, t, noise, VLB_WEIGHT)["loss"].mean())


def test_a_short_fine_tune_lowers_the_loss_moves_every_adapter_tensor_and_keeps_the_base(tiny_base):
    torch.manual_seed(0)
    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    frozen = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters()}
    frozen |= {f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers()}
    assert frozen, "the model has no weights to check"
    diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
    data = _stripes()
    request = FinetuneRequest(dataset_url="x", adapter="a", steps=20, batch_size=16, learning_rate=1e-2)
    run = TrainingRun(model, diffusion, data, request)
    start = {k: v.detach().clone() for k, v in run.params.items()}
    # Every adapted layer carries a trainable bias; the default placement adds gammas.
    assert sum(k.endswith(".bias") for k in start) == len(model.layers)
    assert any(k.endswith(".gamma") for k in start) and CLASS_TABLE in start

    before = _eval_loss(model, diffusion, data, run.params)
    while not run.step():
        pass
    after = _eval_loss(model, diffusion, data, run.params)

    assert run.progress.step == 20
    assert after < 0.8 * before, (before, after)
    # Every element of every tensor: each bias and gamma channel, each class row and the null row
    # (10% label dropout reaches it) gets a gradient, so AdamW moves it.
    unmoved = [k for k, v in run.params.items() if not bool((v.detach() != start[k]).all())]
    assert not unmoved, f"adapter tensors (or some of their elements) training did not move: {unmoved}"
    changed = [k for k, v in frozen.items() if not torch.equal(v, _current(model, k))]
    assert not changed, f"base weights or banks changed by training: {changed}"


def _current(model: DiffFitDiT, key: str) -> torch.Tensor:
    kind, _, name = key.partition(":")
    source = model.named_parameters() if kind == "param" else model.named_buffers()
    return dict(source)[name]
