"""Torch-free reading of the adapter file format.

An adapter is a ``.safetensors`` file: an 8-byte little-endian header
length, a JSON header naming every tensor (dtype, shape, byte offsets) and
the raw tensor bytes. Its ``__metadata__`` holds one key, ``"difffit"``,
whose value is a JSON string (method, base model hash, class names, ...).
The service validates uploads and lists adapters with this module alone,
so it must never import torch.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from difffit.errors import InvalidRequest

METADATA_KEY = "difffit"
# safetensors itself refuses headers above 100 MB; an adapter's is tiny.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(f"not a valid adapter file: {message}")


def _header_length(prefix: bytes, total: int) -> int:
    if len(prefix) < 8:
        raise _fail(f"{total} bytes is too short for a safetensors header (needs at least 8)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length < 2 or length > MAX_HEADER_BYTES:
        raise _fail(f"header length {length} is out of range")
    if 8 + length > total:
        raise _fail(f"header claims {length} bytes but the file has only {total - 8} after the length")
    return length


def _parse(header_bytes: bytes, data_len: int, require_metadata: bool) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail("header is not a JSON object")

    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise _fail("__metadata__ must map strings to strings")

    tensors: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _fail(f"entry for tensor {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _fail(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _fail(f"tensor {name!r} has data offsets {offsets!r} outside the {data_len} data bytes")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise _fail(
                f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes "
                f"but its offsets span {offsets[1] - offsets[0]}"
            )
        tensors[name] = {"dtype": dtype, "shape": list(shape)}
        spans.append((offsets[0], offsets[1], name))

    # Same rule as safetensors: tensors tile the data buffer with no gaps
    # or overlaps, so no bytes can hide between them.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _fail(f"tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != data_len:
        raise _fail(f"tensors cover {position} of the {data_len} data bytes")

    metadata: dict[str, Any] = {}
    if METADATA_KEY in raw_meta:
        try:
            metadata = json.loads(raw_meta[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise _fail(f"__metadata__[{METADATA_KEY!r}] is not valid JSON ({exc})") from None
        if not isinstance(metadata, dict):
            raise _fail(f"__metadata__[{METADATA_KEY!r}] is not a JSON object")
    elif require_metadata:
        raise _fail(f"__metadata__ has no {METADATA_KEY!r} entry (not a DiffFit adapter)")
    return {"tensors": tensors, "metadata": metadata}


def read_header(data: bytes, *, require_metadata: bool = True) -> dict[str, Any]:
    """Parse and validate the header of an adapter file held in memory.

    Returns ``{"tensors": {name: {"dtype", "shape"}}, "metadata": dict}``
    where metadata is the parsed ``__metadata__["difffit"]`` JSON. Raises
    InvalidRequest saying what is wrong on truncated or malformed input,
    or when the DiffFit metadata is missing (unless `require_metadata` is
    False, in which case metadata is ``{}``).
    """
    data = bytes(data)
    length = _header_length(data[:8], len(data))
    return _parse(data[8 : 8 + length], len(data) - 8 - length, require_metadata)


def read_header_file(path: Path, *, require_metadata: bool = True) -> dict[str, Any]:
    """Like `read_header` for a file on disk, reading only its header bytes."""
    path = Path(path)
    total = path.stat().st_size
    with path.open("rb") as fh:
        length = _header_length(fh.read(8), total)
        header_bytes = fh.read(length)
    return _parse(header_bytes, total - 8 - length, require_metadata)
