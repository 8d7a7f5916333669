"""Tiny random DiT folders in diffusers layout, for tests and benchmarks.

Random weights (no download is possible here); DiT's zero-initialised
adaLN and output layers are given small random values so that every layer
matters and equality tests can fail. With ``vae=True`` a tiny random
``AutoencoderKL`` (2 levels: 16 px images <-> 8x8x4 latents) exercises the
latent code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def tiny_transformer(
    num_classes: int = 10,
    in_channels: int = 1,
    sample_size: int = 8,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    patch_size: int = 2,
    seed: int = 0,
):
    """A small DiTTransformer2DModel with learned sigma and non-trivial weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:  # keep the converter's copies equal
            block.norm1.emb.load_state_dict(shared)
    return model.eval()


def tiny_vae(seed: int = 0):
    """A 2-level AutoencoderKL: [B, 3, 16, 16] images <-> [B, 4, 8, 8] latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def scheduler_config_kwargs() -> dict:
    """DiT's diffusion: 1000 linear betas 1e-4..0.02, learned-range variance."""
    return dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
    )


def save_base(
    out_dir: str | Path,
    transformer,
    vae=None,
    class_names: list[str] | None = None,
) -> Path:
    """Write a diffusers DiT folder (model_index.json, transformer/, scheduler/, vae/)."""
    from diffusers import DDPMScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out / "transformer")
    DDPMScheduler(**scheduler_config_kwargs()).save_pretrained(out / "scheduler")
    if vae is not None:
        vae.save_pretrained(out / "vae")
    n = transformer.config.num_embeds_ada_norm
    names = class_names or [f"class{i}" for i in range(n)]
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": ["diffusers", "AutoencoderKL"] if vae is not None else [None, None],
        "id2label": {str(i): name for i, name in enumerate(names)},
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "labels.json").write_text(json.dumps(names))
    return out


def make_tiny_base(
    out_dir: str | Path, vae: bool = False, num_classes: int = 10, seed: int = 0, **kw
) -> Path:
    """A tiny random base: pixel space 1x8x8 by default, or 3x16x16 images via a VAE."""
    if vae:
        transformer = tiny_transformer(num_classes, in_channels=4, sample_size=8, seed=seed, **kw)
        return save_base(out_dir, transformer, tiny_vae(seed))
    return save_base(out_dir, tiny_transformer(num_classes, seed=seed, **kw))
