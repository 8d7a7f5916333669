"""DiT-XL/2 and its VAE as diffusers configs: XL-shaped models with random weights, offline.

The dicts are the published configs of ``facebook/DiT-XL-2-256``
(``transformer/``, ``scheduler/``) and of ``stabilityai/sd-vae-ft-ema``
(the VAE DiT was trained with), written out because nothing can be
downloaded on these machines. Tests cut the depth (``num_layers``) for time;
``bench/bench_xl.py`` counts memory for all 28 blocks. One place, so the
test and the bench build the same model.
"""

from __future__ import annotations

import copy

# diffusers DiTTransformer2DModel(**DIT_XL_2): 1152 wide, 16 heads x 72, patch 2,
# 4 latent channels in, 8 out (learned sigma), 1000 classes, adaLN-Zero.
DIT_XL_2: dict = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    dropout=0.0,
    norm_num_groups=32,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
)

# diffusers AutoencoderKL(**SD_VAE_FT_EMA): 256 px RGB <-> 32x32x4 latents (8x down).
SD_VAE_FT_EMA: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
    force_upcast=True,
)

# DiT's diffusion: linear betas 1e-4..0.02 over 1000 steps, learned variance.
DIT_SCHEDULER: dict = dict(
    _class_name="DDPMScheduler",
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    num_train_timesteps=1000,
    clip_sample=False,
    prediction_type="epsilon",
    variance_type="learned_range",
)


def dit_xl_config(num_layers: int = 28, num_classes: int = 1000) -> dict:
    """DiT-XL/2's config with the depth (and optionally the class count) changed."""
    config = copy.deepcopy(DIT_XL_2)
    config.update(num_layers=num_layers, num_embeds_ada_norm=num_classes)
    return config


def xl_transformer(num_layers: int = 28, num_classes: int = 1000, seed: int = 0, device: str = "cpu"):
    """A DiTTransformer2DModel of DiT-XL/2's shape with random weights (fp32, eval, frozen).

    Every weight gets N(0, 0.02^2) added (DiT zero-inits adaLN and the output
    layer; random values give every layer a say), and the per-block copies of
    the timestep embedder and class table are made equal, as diffusers'
    converter leaves them, so the adapter model can tie them.
    """
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = DiTTransformer2DModel(**dit_xl_config(num_layers, num_classes))
    if device != "meta":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            shared = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(shared)
    return model.eval().requires_grad_(False)


def sd_vae(seed: int = 0):
    """An AutoencoderKL of sd-vae-ft-ema's shape with random weights (fp32, eval, frozen)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**SD_VAE_FT_EMA).eval().requires_grad_(False)


def xl_base(num_layers: int = 28, dtype=None, device: str = "cpu", seed: int = 0):
    """A resident base of DiT-XL/2's shape with the sd-vae-ft-ema VAE, random weights.

    Placed as a loaded base is (:func:`core.base_model.place`): the transformer
    in `dtype`, the VAE in fp32 (its config asks for force_upcast). Class names
    are the indices 0..999.
    """
    import torch

    from core.base_model import BaseModel, place, tensors_hash

    transformer, vae = xl_transformer(num_layers, seed=seed), sd_vae(seed)
    content_hash = tensors_hash(transformer, vae)
    place(transformer, vae, device, dtype or torch.float32)
    return BaseModel(
        model_id=f"xl-shaped-random-{num_layers}-blocks",
        content_hash=content_hash,
        transformer=transformer,
        vae=vae,
        scheduler_config=dict(DIT_SCHEDULER),
        class_names=[str(i) for i in range(transformer.config.num_embeds_ada_norm)],
    )
