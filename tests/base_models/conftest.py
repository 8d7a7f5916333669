"""Shared fixtures: a tiny broad corpus from two DejaVu fonts and a fake Fashion-MNIST."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from base_models.build_corpus import build, parse_args
from tests.idx import write_idx

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf"]  # two families
FILES = ["train_images.npy", "train_labels.npy", "heldout_images.npy", "heldout_labels.npy", "labels.json"]


@pytest.fixture(scope="module")
def fonts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((DEJAVU / f).is_file() for f in FONTS):
        pytest.skip(f"needs {FONTS} in {DEJAVU} (apt-get install fonts-dejavu-core)")
    folder = tmp_path_factory.mktemp("fonts")
    for f in FONTS:
        shutil.copy(DEJAVU / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("fmnist")
    for prefix, n in (("train", 60), ("t10k", 30)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def build_tiny(fonts: Path, fashion: Path, out: Path) -> dict:
    return build(
        parse_args(
            ["--font-dir", str(fonts), "--fashion-dir", str(fashion), "--out", str(out)]
            + ["--min-families", "2", "--max-classes", "5", "--per-class", "6", "--heldout-per-class", "2"]
            + ["--seed", "3"]
        )
    )


@pytest.fixture(scope="module")
def corpus(fonts: Path, fake_fashion: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_tiny(fonts, fake_fashion, out)
    return out
