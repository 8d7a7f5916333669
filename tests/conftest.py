"""Shared fixtures: tiny random DiT folders in diffusers layout (core and worker tests), and an
S3-compatible server (tests/s3.py).

Session-scoped here (not per folder) so every test folder builds each base, and starts the
S3 server, once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from base_models.tiny import make_tiny_base
from tests.s3 import moto_server, new_bucket


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """Pixel-space tiny base: 1x8x8 images, 2 blocks, 10 classes."""
    return str(make_tiny_base(tmp_path_factory.mktemp("tiny_base")))


@pytest.fixture(scope="session")
def tiny_vae_base(tmp_path_factory) -> str:
    """Latent tiny base: 3x16x16 images <-> 4x8x8 latents through a tiny random VAE."""
    return str(make_tiny_base(tmp_path_factory.mktemp("tiny_vae_base"), vae=True))


def random_adapter(model, placement, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An adapter with every tensor perturbed, so equality tests can fail."""
    g = torch.Generator().manual_seed(seed)
    tensors = model.init_adapter(placement, num_classes, generator=g)
    return {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on loopback, one per session."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return new_bucket(s3_endpoint)
