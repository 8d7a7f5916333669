"""Check an uploaded adapter file against the resident base, torch-free.

The base is what the live workers publish (:class:`difffit.contract.WorkerStats`):
its content hash and an :class:`difffit.contract.AdapterSpec` (each adapted
layer's width, where gamma may go, the class table's width, the class cap,
the resolution unit). The file format itself is :mod:`difffit.adapter_format`'s
(read with safetensors' numpy API). A file passes when:

- safetensors reads it and it is a DiffFit adapter (:func:`adapter_format.validate`:
  format and version, metadata, float32 tensors named by the naming rule, a
  class table of len(class_names) + 1 rows);
- it was trained on this base (same content hash);
- every tensor fits the base (:func:`adapter_format.check_shapes`: every bias
  present with its layer's width, gamma only where placeable, the class table
  [classes + 1, hidden_size]) within the class cap;
- every value is finite;
- method and resolution are ones this base serves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from difffit.adapter_format import CLASS_TABLE, check_shapes, read_adapter, read_header, tensor_name, validate
from difffit.contract import AdapterSpec
from difffit.errors import IncompatibleAdapter, InvalidRequest

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
    validate(header)
    return header


def spec_shapes(spec: AdapterSpec) -> tuple[dict[str, tuple[int | None, ...]], set[str]]:
    """(allowed name -> shape, required names) of an adapter for the base `spec` describes."""
    shapes: dict[str, tuple[int | None, ...]] = {tensor_name(n, "bias"): (w,) for n, w in spec.layers.items()}
    for name in spec.gamma_layers:
        shapes[tensor_name(name, "gamma")] = (spec.layers[name],)
    shapes[CLASS_TABLE] = (None, spec.hidden_size)
    required = {tensor_name(n, "bias") for n in spec.layers} | {CLASS_TABLE}
    return shapes, required


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

    if len(class_names) > spec.max_classes:
        raise IncompatibleAdapter(
            f"the adapter has {len(class_names)} classes; this deployment allows at most "
            f"{spec.max_classes} (DIFFFIT_MAX_CLASSES)"
        )
    allowed, required = spec_shapes(spec)
    check_shapes({n: tuple(t["shape"]) for n, t in tensors.items()}, allowed, required)
    read_adapter(data)  # every value finite (NaN or infinity: InvalidRequest)
    trainable = sum(math.prod(t["shape"]) for t in tensors.values())
    return CheckedAdapter(meta, list(class_names), method, resolution, trainable, base_hash)
