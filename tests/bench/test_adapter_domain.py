"""bench/adapter_domain.py: the held-out Fashion-MNIST split and a smoke run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bench import adapter_domain
from bench.paper.data import DatasetUnavailable, load_dataset
from tests.idx import write_idx


@pytest.fixture
def fmnist_dir(tmp_path):
    """t10k files only (1000 images, labels 0..9 repeated: class k is a bar at row 2k), no train files."""
    labels = np.tile(np.arange(10), 100)
    images = np.zeros((1000, 28, 28), np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 4 : 2 * k + 8, 4:24] = 255
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_fashion_heldout_takes_the_test_files_and_splits_each_class_80_20(fmnist_dir):
    data = adapter_domain.fashion_heldout(fmnist_dir, images=500, seed=0)
    # The first 500 of t10k: 50 per class, 40 train and 10 test each.
    assert data.train_x.shape == (400, 1, 32, 32) and data.test_x.shape == (100, 1, 32, 32)
    assert np.bincount(data.train_y.numpy()).tolist() == [40] * 10
    assert np.bincount(data.test_y.numpy()).tolist() == [10] * 10
    assert float(data.train_x.min()) == -1.0 and float(data.train_x.max()) == 1.0
    assert data.class_names[9] == "Ankle boot"


def test_fashion_heldout_says_which_package_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        adapter_domain.fashion_heldout(tmp_path, images=100, seed=0)


def test_quick_run_writes_every_figure_and_the_grid(fmnist_dir, tmp_path):
    try:
        load_dataset("mnist")
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "out"
    assert adapter_domain.main(["--quick", "--fmnist-dir", str(fmnist_dir), "--out", str(out)]) == 0
    results = json.loads((out / "adapter_domain.json").read_text())
    assert list(results["sets"]) == ["fashion", "mnist"]
    for row in results["sets"].values():
        first, last = (row["checkpoints"][str(s)] for s in adapter_domain.QUICK.checkpoints)
        assert 0 <= first["cond_acc"] <= 1 and 0 <= last["cond_acc"] <= 1
        assert 0 < first["train_seconds"] < last["train_seconds"]  # one run, snapshotted on the way
    assert 0 <= results["sets"]["fashion"]["base_own_table_cond_acc"] <= 1
    report = (out / "adapter_domain.md").read_text()
    assert "| fashion (320 train) |" in report and "| mnist (320 train) |" in report
    # Per set: real + one panel per checkpoint, up to 4 columns of 34 px (32 + pad), upscaled 2x.
    width = Image.open(out / "adapter_domain.png").width
    panels = 2 * (1 + len(adapter_domain.QUICK.checkpoints))
    columns = min(adapter_domain.GRID_COLUMNS, adapter_domain.QUICK.samples // 10)
    assert width == 2 * (panels * (columns * 34 + 2) + (panels - 1) * 8)
