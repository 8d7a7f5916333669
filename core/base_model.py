"""Loading the resident base: a diffusers DiT folder or hub id, optional VAE.

The layout is diffusers' (``model_index.json``, ``transformer/``,
``scheduler/``, optionally ``vae/``), e.g. ``facebook/DiT-XL-2-256`` or the
bundled ``base_models/fmnist-dit`` (pixel space, no VAE).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class BaseModel:
    """The loaded base and what the rest of the worker needs to know about it."""

    model_id: str
    content_hash: str  # sha256 over the transformer (and VAE) tensors
    transformer: nn.Module  # plain diffusers DiTTransformer2DModel
    vae: nn.Module | None
    scheduler_config: dict
    class_names: list[str]

    @property
    def in_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def learned_sigma(self) -> bool:
        return self.transformer.config.out_channels == 2 * self.in_channels

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD's VAE, 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.in_channels

    @property
    def resolution(self) -> int:
        """Native image side in pixels."""
        return self.transformer.config.sample_size * self.vae_scale

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] pixels in [-1, 1] -> scaled latents [N, 4, H/8, W/8] (posterior mean), fp32.

        Pixel space (no VAE): the pixels themselves. Runs in the VAE's own dtype
        (fp32 when its config asks for force_upcast), whatever the base's.
        """
        if self.vae is None:
            return pixels.float()
        out = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean * self.latent_scaling
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, 4, h, w] (any dtype) -> pixels [N, C, 8h, 8w] in the VAE's dtype."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents.to(self.vae.dtype) / self.latent_scaling).sample


def tensors_hash(*modules: nn.Module | None) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for index, module in enumerate(m for m in modules if m is not None):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{index}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_json(source: str, name: str) -> dict | None:
    path = Path(source) / name
    if path.is_file():
        return json.loads(path.read_text())
    if Path(source).exists():
        return None
    from huggingface_hub import hf_hub_download  # hub ids only

    try:
        return json.loads(Path(hf_hub_download(source, name)).read_text())
    except Exception:  # noqa: BLE001 - optional files
        return None


def class_names_for(source: str, num_classes: int) -> list[str]:
    """Class names from labels.json, else model_index id2label, else indices."""
    labels = _read_json(source, "labels.json")
    if isinstance(labels, list) and len(labels) == num_classes:
        return [str(x) for x in labels]
    index = _read_json(source, "model_index.json") or {}
    id2label = index.get("id2label")
    if isinstance(id2label, dict) and len(id2label) == num_classes:
        return [str(id2label[str(i)]).split(",")[0].strip() for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def load_base(
    source: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load a diffusers DiT folder or hub id; hash it before any dtype change."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer")
    index = _read_json(source, "model_index.json") or {}
    vae_entry = index.get("vae")
    vae = None
    if isinstance(vae_entry, list) and vae_entry and vae_entry[0] is not None:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler"))
    content_hash = tensors_hash(transformer, vae)
    names = class_names_for(source, transformer.config.num_embeds_ada_norm)
    place(transformer, vae, device, dtype)
    return BaseModel(
        model_id=str(source),
        content_hash=content_hash,
        transformer=transformer,
        vae=vae,
        scheduler_config=scheduler_config,
        class_names=names,
    )


def place(transformer: nn.Module, vae: nn.Module | None, device, dtype: torch.dtype) -> None:
    """Move the base to `device`; the transformer takes `dtype`, the VAE too unless its
    config asks for ``force_upcast`` (SD's VAE overflows in fp16 and loses detail in
    bf16; it is ~3% of DiT-XL/2's compute), then it stays fp32."""
    for module in (transformer, vae):
        if module is None:
            continue
        module.to(device=device)
        keep_fp32 = module is vae and bool(getattr(vae.config, "force_upcast", False))
        # Cast only when needed: diffusers warns on any .to(dtype) of a loaded model.
        if dtype != torch.float32 and not keep_fp32:
            module.to(dtype=dtype)
        module.eval().requires_grad_(False)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
