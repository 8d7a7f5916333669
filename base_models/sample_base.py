"""Sample a grid from the Fashion-MNIST DiT base model: one row per class.

DDIM (eta 0), 50 steps, classifier-free guidance on all channels (the null class is
``num_embeds_ada_norm``), the learned-variance half of the output dropped, as diffusers'
DiTPipeline does. Writes ``<model>/samples.png``: 10 rows x 8 samples, nearest-upscaled.

Usage (from the repository root)::

    .venv/bin/python base_models/sample_base.py [--model base_models/fmnist-dit] [--scale 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def sample(
    model: DiTTransformer2DModel,
    scheduler: DDIMScheduler,
    labels: torch.Tensor,
    guidance_scale: float = 4.0,
    steps: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """labels: [N] long -> images [N, C, H, W] in [-1, 1], on the CPU.

    The model must be on ``device``; the noise is drawn on the CPU (the same on every device).
    """
    n = labels.shape[0]
    c, size = model.config.in_channels, model.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g).to(device)
    labels = labels.to(device)
    null = torch.full_like(labels, model.config.num_embeds_ada_norm)
    scheduler.set_timesteps(steps)
    y_in = torch.cat([labels, null]) if guidance_scale != 1.0 else labels
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guidance_scale != 1.0 else x
        t_in = torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = model(x_in, timestep=t_in, class_labels=y_in).sample[:, :c]  # drop learned sigma
        if guidance_scale != 1.0:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1).cpu()


def to_grid(images: torch.Tensor, rows: int, upscale: int = 3, pad: int = 2) -> Image.Image:
    """[N, 1, H, W] in [-1, 1] -> a grayscale grid with ``rows`` rows, white separators."""
    n, _, h, w = images.shape
    cols = n // rows
    arr = ((images[:, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = arr[i]
    img = Image.fromarray(grid, mode="L")
    return img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "base_models" / "fmnist-dit"))
    p.add_argument("--out", default=None, help="default: <model>/samples.png")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--scale", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clip-sample",
        action="store_true",
        help="clip DDIM's x0 prediction to [-1, 1] at every step (off in the saved config)",
    )
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    model = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=args.clip_sample)
    num_classes = model.config.num_embeds_ada_norm
    names = json.loads((folder / "labels.json").read_text())
    assert len(names) == num_classes
    labels = torch.arange(num_classes).repeat_interleave(args.per_class)
    images = sample(model, scheduler, labels, args.scale, args.steps, args.seed)
    out = Path(args.out) if args.out else folder / "samples.png"
    to_grid(images, rows=num_classes).save(out)
    print(f"wrote {out}: rows = {', '.join(names)}")


if __name__ == "__main__":
    main()
