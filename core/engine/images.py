"""Tensors <-> PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_png(image: torch.Tensor) -> bytes:
    """[C, H, W] in [-1, 1] (C = 1 or 3) -> PNG bytes (mode L or RGB)."""
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    if array.shape[0] == 1:
        pil = Image.fromarray(array[0], mode="L")
    else:
        pil = Image.fromarray(np.transpose(array[:3], (1, 2, 0)), mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def to_pngs(images: torch.Tensor) -> list[bytes]:
    """[N, C, H, W] in [-1, 1] (what the engine resolves to) -> N PNG files."""
    return [to_png(img) for img in images]


def grid_png(pngs: list[bytes], columns: int, scale: int = 1) -> bytes:
    """Tile PNG images (same size) into one grid PNG, optionally upscaled."""
    images = [Image.open(io.BytesIO(p)) for p in pngs]
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new(images[0].mode, (columns * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()
