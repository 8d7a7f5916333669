"""The base in bf16 (VAE kept fp32 by force_upcast) and the 2x position grid (issue 13)."""

from __future__ import annotations

import torch

from core.base_model import load_base


def test_bf16_base_keeps_the_vae_fp32_when_its_config_asks_for_force_upcast(tiny_vae_base):
    base = load_base(tiny_vae_base, dtype=torch.bfloat16)
    assert base.vae.config.force_upcast
    assert base.transformer.dtype == torch.bfloat16 and base.vae.dtype == torch.float32
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = base.encode(pixels.to(torch.bfloat16))
    assert latents.dtype == torch.float32 and latents.shape == (2, 4, 8, 8)
    images = base.decode(latents.to(torch.bfloat16))  # the engine's latents are in the base's dtype
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)


def test_a_grid_twice_the_base_side_sits_at_positions_i_over_2(tiny_base):
    """diffusers' PatchEmbed keeps the base's grid size, so a 2x grid gets (i/2, j/2) positions:
    every even cell of the 16 px grid carries exactly the 8 px grid's embedding (the paper's trick)."""
    base = load_base(tiny_base)
    embed = base.transformer.pos_embed
    with torch.no_grad():
        small = embed(torch.zeros(1, 1, 8, 8))[0]  # 4 x 4 patches
        large = embed(torch.zeros(1, 1, 16, 16))[0]  # 8 x 8 patches
    dim = small.shape[-1]
    small, large = small.view(4, 4, dim), large.view(8, 8, dim)
    assert torch.allclose(large[::2, ::2], small, atol=1e-6)
    assert not torch.allclose(large[1::2, 1::2], small, atol=1e-3)  # odd cells sit half-way between
