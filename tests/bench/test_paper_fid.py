"""FID: the exact low-rank formula, the Inception pre-processing, and sanity on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.paper.fid import (
    INPUT_RANGE,
    FeatureStats,
    FidUnavailable,
    InceptionFeatures,
    fid_from_features,
    frechet_distance,
    nv_bilinear,
    preprocess,
)


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm (what pytorch-fid / fid-helper compute)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy_linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


@pytest.mark.parametrize(("n1", "n2", "d"), [(30, 40, 64), (200, 150, 16)])
def test_exact_fid_matches_sqrtm_formula(n1, n2, d):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n1, d))
    b = rng.normal(size=(n2, d)) * 1.3 + 0.5
    assert fid_from_features(a, b) == pytest.approx(reference_fid(a, b), rel=1e-4, abs=1e-4)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 32))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, a + 0.5) == pytest.approx(32 * 0.25, rel=1e-6)
    stats = FeatureStats.of(a)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-6)


def test_preprocess_matches_fid_helper_conventions():
    x = torch.linspace(-1, 1, 2 * 32 * 32).reshape(2, 1, 32, 32)
    out = preprocess(x)
    assert out.shape == (2, 3, 299, 299)
    assert out.min() >= INPUT_RANGE[0] and out.max() <= INPUT_RANGE[1]
    assert torch.equal(out[:, 0], out[:, 2])  # grayscale repeated
    # black -> -1, white -> 0.9921875 (the TF Inception range)
    assert torch.allclose(preprocess(torch.full((1, 1, 8, 8), -1.0)), torch.tensor(-1.0))
    assert torch.allclose(preprocess(torch.ones(1, 1, 8, 8)), torch.tensor(INPUT_RANGE[1]))
    # nv_bilinear keeps constants and is the identity at the same size
    assert torch.allclose(nv_bilinear(torch.full((1, 1, 7, 7), 3.0)), torch.tensor(3.0))
    y = torch.rand(1, 1, 299, 299)
    assert torch.allclose(nv_bilinear(y), y, atol=1e-4)


def test_inception_fid_real_images():
    """Same images -> ~0; the same images shifted in brightness -> clearly larger."""
    try:
        net = InceptionFeatures(batch_size=16)
    except FidUnavailable as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    # Blocky blobs at the base's size: 6 images, and the same ones brightened.
    x = (torch.rand(6, 1, 8, 8) * 2 - 1).repeat_interleave(4, -1).repeat_interleave(4, -2)
    feats = net(x)
    assert feats.shape == (6, 2048)
    shifted = net((x + 0.6).clamp(-1, 1))
    same = fid_from_features(feats, feats)
    moved = fid_from_features(feats, shifted)
    assert same == pytest.approx(0.0, abs=1e-3)
    assert moved > 10.0
