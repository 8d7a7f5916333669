"""Check an uploaded adapter file against the resident base, torch-free.

The base is what the live workers publish (:class:`difffit.contract.WorkerStats`):
its content hash and an :class:`difffit.contract.AdapterSpec` (each adapted
layer's width, where gamma may go, the class table's width, the class cap,
the resolution unit). A file passes when:

- its header parses (:func:`adapters_store.adapter_file.read_header`: tensors
  tile the data, offsets and sizes agree) and it is this project's format;
- it was trained on this base (same content hash);
- every tensor is float32, named after a layer of the base with that layer's
  width (every bias present, gamma only where placeable), the class table is
  [len(class_names) + 1, hidden_size] within the class cap;
- every value is finite (read with safetensors' numpy API);
- method and resolution are ones this base serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapters_store.adapter_file import read_header
from difffit.contract import AdapterSpec
from difffit.errors import IncompatibleAdapter, InvalidRequest

FORMAT = "difffit-adapter"
FORMAT_VERSION = 1
CLASS_TABLE = "class_table"
METHODS = ("difffit", "bitfit")


@dataclass
class CheckedAdapter:
    """What the registry needs of a file that passed."""

    metadata: dict[str, Any]
    class_names: list[str]
    method: str
    resolution: int
    trainable_params: int
    base_hash: str


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(f"not a valid adapter file: {message}")


def read_adapter_header(data: bytes) -> dict[str, Any]:
    """The parsed header of a file in this project's format (no base needed); InvalidRequest otherwise."""
    header = read_header(data)
    meta = header["metadata"]
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise _bad(
            f"format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return header


def check_adapter(data: bytes, base_hash: str, spec: AdapterSpec) -> CheckedAdapter:
    """Validate an adapter file for the base (hash, spec); raise InvalidRequest or IncompatibleAdapter."""
    header = read_adapter_header(data)
    meta, tensors = header["metadata"], header["tensors"]
    if meta.get("base_hash") != base_hash:
        raise IncompatibleAdapter(
            f"the adapter was trained on base {meta.get('base_model')!r} with content hash "
            f"{str(meta.get('base_hash'))[:12]}...; this deployment serves base hash {base_hash[:12]}..."
        )
    class_names = meta.get("class_names")
    if (
        not isinstance(class_names, list)
        or not class_names
        or not all(isinstance(c, str) for c in class_names)
    ):
        raise _bad("metadata class_names must be a non-empty list of strings")
    if len(set(class_names)) != len(class_names):
        raise _bad("metadata class_names has duplicates")
    method = meta.get("method")
    if method not in METHODS:
        raise _bad(f"method {method!r} is not one of {', '.join(METHODS)}")
    resolution = meta.get("resolution")
    unit = max(spec.resolution_unit, 1)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % unit:
        raise IncompatibleAdapter(f"resolution {resolution!r} is not a positive multiple of {unit}")

    _check_tensors(tensors, spec, len(class_names))
    _check_finite(data)
    trainable = sum(math.prod(t["shape"]) for t in tensors.values())
    return CheckedAdapter(meta, list(class_names), method, resolution, trainable, base_hash)


def _check_tensors(tensors: dict[str, dict[str, Any]], spec: AdapterSpec, num_classes: int) -> None:
    for name, info in tensors.items():
        if info["dtype"] != "F32":
            raise _bad(f"tensor {name!r} is {info['dtype']}; adapter tensors are float32 (F32)")
    table = tensors.get(CLASS_TABLE)
    expected = [num_classes + 1, spec.hidden_size]
    if table is None or table["shape"] != expected:
        got = None if table is None else table["shape"]
        raise IncompatibleAdapter(f"class_table must have shape {expected} (classes + null row); got {got}")
    if num_classes > spec.max_classes:
        raise IncompatibleAdapter(
            f"the adapter has {num_classes} classes; this deployment allows at most {spec.max_classes} "
            "(DIFFFIT_MAX_CLASSES)"
        )
    missing = [f"{layer}.bias" for layer in spec.layers if f"{layer}.bias" not in tensors]
    if missing:
        raise IncompatibleAdapter(
            f"the adapter lacks {len(missing)} bias tensors of this base, e.g. {missing[0]}"
        )
    gamma_ok = set(spec.gamma_layers)
    for name, info in tensors.items():
        if name == CLASS_TABLE:
            continue
        layer, _, kind = name.rpartition(".")
        width = spec.layers.get(layer)
        if width is None or kind not in ("bias", "gamma"):
            raise IncompatibleAdapter(f"tensor {name!r} matches no layer of this base")
        if kind == "gamma" and layer not in gamma_ok:
            raise IncompatibleAdapter(f"gamma is not allowed on {layer}")
        if info["shape"] != [width]:
            raise IncompatibleAdapter(f"{name} has shape {info['shape']}; this base expects [{width}]")


def _check_finite(data: bytes) -> None:
    import numpy as np
    from safetensors.numpy import load

    try:
        arrays = load(data)
    except Exception as exc:  # safetensors' own parse errors
        raise _bad(f"safetensors could not read it ({exc})") from None
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise _bad(f"tensor {name!r} has {bad} non-finite values (NaN or infinity)")
