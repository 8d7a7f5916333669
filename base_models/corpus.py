"""Read the broad corpus that ``build_corpus.py`` writes, for training (train_base.py) and the gate.

A corpus folder holds ``{train,heldout}_{images,labels}.npy`` (each also accepted gzipped, as
``.npy.gz``, the form a GPU run carries), ``labels.json`` and ``corpus.json``.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Corpus:
    """images: [N, 1, 32, 32] float32 in [-1, 1]; labels: [N] long; flippable: [C] bool."""

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    flippable: torch.Tensor
    source: str


def _load_npy(folder: Path, key: str) -> np.ndarray:
    plain, packed = folder / f"{key}.npy", folder / f"{key}.npy.gz"
    if plain.exists():
        return np.load(plain, allow_pickle=False)
    if packed.exists():
        with gzip.open(packed, "rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)
    raise FileNotFoundError(f"{folder}: no {key}.npy (or .npy.gz); build it with base_models/build_corpus.py")


def subset_indices(num_classes: int, keep: int) -> list[int]:
    """``keep`` class indices spread evenly over ``num_classes`` (all of them when keep is 0 or more)."""
    if keep <= 0 or keep >= num_classes:
        return list(range(num_classes))
    return sorted({int(i * num_classes / keep) for i in range(keep)})


def load_corpus(
    folder: str | Path, split: str = "train", class_subset: int = 0, names: list[str] | None = None
) -> Corpus:
    """The ``split`` ("train" or "heldout") of a corpus, relabelled to the chosen classes.

    ``class_subset`` keeps that many classes spread over the list (the probes' smaller task);
    ``names`` keeps exactly those classes, in that order (the gate, matching a model's labels.json).
    """
    folder = Path(folder)
    all_names = json.loads((folder / "labels.json").read_text())
    info = json.loads((folder / "corpus.json").read_text())
    if names is not None:
        missing = [n for n in names if n not in all_names]
        if missing:
            raise ValueError(f"{folder}: classes not in this corpus: {missing[:5]}")
        keep = [all_names.index(n) for n in names]
    else:
        keep = subset_indices(len(all_names), class_subset)
    x = _load_npy(folder, f"{split}_images")
    y = _load_npy(folder, f"{split}_labels").astype(np.int64)
    remap = np.full(len(all_names), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    mask = remap[y] >= 0
    images = torch.from_numpy(x[mask]).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(remap[y[mask]])
    flip = set(info.get("flip_classes", []))
    flippable = torch.tensor([k in flip for k in keep], dtype=torch.bool)
    return Corpus(images, labels, [all_names[k] for k in keep], flippable, str(folder))
