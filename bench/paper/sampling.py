"""Sampling for the study: the worker's own DDIM path, and sample grids.

Every method samples through ``core.engine.sampling`` (``SampleRequest`` +
``denoise_step``): DDIM (eta 0), classifier-free guidance on the eps half as
diffusers' DiTPipeline does. Adapters (BitFit, DiffFit, Diff-Tuning) run on a
``DiffFitDiT`` slot; the full and LoRA models are plain diffusers transformers
behind :class:`PlainDiT`, which gives them the same call signature.

The noise is drawn per chunk from ``seed + chunk index``, so every method of a
data set starts from the same noise under the same labels (paired samples).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.adapter.layers import Route
from core.engine.sampling import SampleRequest, denoise_step


class PlainDiT(nn.Module):
    """A plain diffusers DiT with DiffFitDiT's call: (x, t, labels, route) -> output."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, route: Route) -> torch.Tensor:
        return self.transformer(x, timestep=t, class_labels=labels).sample


def balanced_labels(n: int, num_classes: int) -> list[int]:
    """0, 1, ..., C-1, 0, 1, ...: uniform over classes (sample i has class i mod C)."""
    return [i % num_classes for i in range(n)]


@torch.no_grad()
def sample_images(
    model: nn.Module,
    scheduler_config: dict,
    labels: list[int],
    null_label: int,
    slot: int = 0,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 1.5,
    chunk: int = 100,
    size: int = 32,
    channels: int = 1,
) -> torch.Tensor:
    """Images [N, C, size, size] in [-1, 1] (clamped, as a decoded picture is).

    labels are in the model's (adapter's) label space; null_label is its null row.
    """
    out = []
    for k, start in enumerate(range(0, len(labels), chunk)):
        r = SampleRequest(f"paper-{k}", None, None, labels[start : start + chunk], seed + k, steps,
                          guidance, "ddim", size)  # fmt: skip
        r.start(scheduler_config, channels, torch.device("cpu"), torch.float32)
        r.slot, r.null_label = slot, null_label
        while not r.done:
            denoise_step(model, [r], learned_sigma=True)
        out.append(r.latents.float().clamp(-1, 1))
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] -> uint8 [N, H, W]."""
    return ((images[:, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def grid_image(
    panels: list[torch.Tensor], rows: int, upscale: int = 2, pad: int = 2, gap: int = 8
) -> Image.Image:
    """Panels side by side, each [rows * cols, 1, H, W] laid out row-major (row = class).

    Sample i of a panel goes to row i mod rows (the order of :func:`balanced_labels`).
    White separators; a wider gap between panels.
    """
    blocks = []
    for images in panels:
        arr = to_uint8(images)
        n, h, w = arr.shape
        cols = n // rows
        block = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, np.uint8)
        for i in range(rows * cols):
            r, c = i % rows, i // rows
            block[
                pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
            ] = arr[i]
        blocks.append(block)
        blocks.append(np.full((block.shape[0], gap), 255, np.uint8))
    img = Image.fromarray(np.concatenate(blocks[:-1], axis=1), mode="L")
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
