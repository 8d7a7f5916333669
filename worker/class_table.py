"""``class_table: keep``: a data set labelled with the base model's own classes.

The paper's 256 -> 512 run fine-tunes on the same classes as the base and
starts from its class table. Each class folder of the data set names a base
class (its name, else its index); the labels become base indices and the
adapter's classes are the base's, so its table has the base's rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from difffit.errors import InvalidDataset
from worker.datasets import ImageSet


def to_base_classes(images: ImageSet, base_names: list[str]) -> ImageSet:
    """Relabel `images` into the base's class space; InvalidDataset names any folder that fits no class."""
    index = {name: i for i, name in enumerate(base_names)}
    mapping = []
    for name in images.class_names:
        if name in index:
            mapping.append(index[name])
        elif name.isdigit() and int(name) < len(base_names):
            mapping.append(int(name))
        else:
            raise InvalidDataset(
                f"class_table keep: folder {name!r} is neither a class name of the base model nor an "
                f"index 0..{len(base_names) - 1}; use class_table new for new classes"
            )
    labels = np.asarray(mapping, dtype=images.labels.dtype)[images.labels]
    return dataclasses.replace(images, labels=labels, class_names=list(base_names))
