"""The adapter file format, in one torch-free module (``../shared/DESIGN.md`` section 1).

An adapter is one ``.safetensors`` file:

- tensors, all float32 (``F32``), named ``"<layer>.bias"`` [out],
  ``"<layer>.gamma"`` [out] and ``"class_table"`` [num_classes + 1, D], where
  ``<layer>`` is a module path of diffusers' DiT (``transformer_blocks.3.attn1.to_q``);
- ``__metadata__`` with one key, ``"difffit"``: a JSON object with the keys of
  :data:`REQUIRED_METADATA` (base model id and content hash, method,
  placement, class names, resolution, ...), see :func:`adapter_metadata`.

Files are read by the ``safetensors`` library (``safe_open`` for a header on
disk, ``deserialize`` for a file in memory), which checks the container
itself (header length, JSON, dtypes, offsets tiling the data);
:func:`validate` then checks what makes it a DiffFit adapter. Shapes against
a particular base are checked by :func:`check_shapes` with the spec the torch
core derives from the base (``core.adapter.method``). ``safetensors`` and
``numpy`` are imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difffit.errors import IncompatibleAdapter, InvalidRequest

if TYPE_CHECKING:
    import numpy as np

METADATA_KEY = "difffit"
FORMAT = "difffit-adapter"
FORMAT_VERSION = 1
CLASS_TABLE = "class_table"
KINDS = ("bias", "gamma")  # the per-layer tensor kinds: "<layer>.<kind>"
DTYPE = "F32"
REQUIRED_METADATA = (
    "format",
    "format_version",
    "base_model",
    "base_hash",
    "method",
    "placement",
    "class_names",
    "num_classes",
    "resolution",
)


# -- names ----------------------------------------------------------------------
def tensor_name(layer: str, kind: str) -> str:
    """``"<layer>.<kind>"`` for kind ``"bias"`` or ``"gamma"``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    return f"{layer}.{kind}"


def split_name(name: str) -> tuple[str, str]:
    """``"<layer>.<kind>"`` -> (layer, kind); ``"class_table"`` -> ("", "class_table").

    Raises InvalidRequest for any other name.
    """
    if name == CLASS_TABLE:
        return "", CLASS_TABLE
    layer, _, kind = name.rpartition(".")
    if not layer or kind not in KINDS:
        raise InvalidRequest(
            f"not a valid adapter file: tensor {name!r} is neither '<layer>.bias', "
            f"'<layer>.gamma' nor {CLASS_TABLE!r}"
        )
    return layer, kind


# -- metadata ---------------------------------------------------------------------
def adapter_metadata(
    *,
    base_model: str,
    base_hash: str,
    method: str,
    placement: dict,
    class_names: list[str],
    resolution: int,
    training: dict | None = None,
    trainable_params: int | None = None,
) -> dict:
    """The metadata header of an adapter file."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "base_hash": base_hash,
        "method": method,
        "placement": placement,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "resolution": resolution,
        "training": training or {},
        "trainable_params": trainable_params,
    }


def encode_metadata(metadata: dict) -> dict[str, str]:
    """The safetensors ``__metadata__`` (str -> str) holding `metadata`."""
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True)}


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(f"not a valid adapter file: {message}")


def _decode_metadata(raw: dict[str, str] | None, require: bool) -> dict[str, Any]:
    raw = raw or {}
    if METADATA_KEY not in raw:
        if require:
            raise _fail(f"__metadata__ has no {METADATA_KEY!r} entry (not a DiffFit adapter)")
        return {}
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise _fail(f"__metadata__[{METADATA_KEY!r}] is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise _fail(f"__metadata__[{METADATA_KEY!r}] is not a JSON object")
    return metadata


# -- reading ------------------------------------------------------------------------
def _open(path: Path, require_metadata: bool) -> tuple[dict, dict]:
    """(tensor infos, metadata) of a file on disk; reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = _decode_metadata(f.metadata(), require_metadata)
            infos = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                part = f.get_slice(name)
                infos[name] = {"dtype": part.get_dtype(), "shape": list(part.get_shape())}
    except SafetensorError as exc:
        raise _fail(f"safetensors refused it ({exc})") from None
    return infos, metadata


def _parse_bytes(data: bytes, require_metadata: bool) -> tuple[dict, dict, dict]:
    """(tensor infos, metadata, arrays) of a file held in memory.

    safetensors' ``deserialize`` checks the container as ``safe_open`` does and
    hands each tensor back as its own writable buffer, so arrays need no
    further copy (a cold adapter load from the store is on the serving path).
    """
    import numpy as np
    from safetensors import SafetensorError, deserialize

    try:
        flat = deserialize(bytes(data))
    except SafetensorError as exc:
        raise _fail(f"safetensors refused it ({exc})") from None
    # The container is valid here, so its header is an 8-byte length and JSON.
    size = int.from_bytes(data[:8], "little")
    metadata = _decode_metadata(json.loads(data[8 : 8 + size]).get("__metadata__"), require_metadata)
    infos, arrays = {}, {}
    for name, view in flat:
        infos[name] = {"dtype": view["dtype"], "shape": list(view["shape"])}
        if view["dtype"] == DTYPE:  # anything else fails validate(), which names it
            arrays[name] = np.frombuffer(view["data"], dtype=np.float32).reshape(view["shape"])
    return infos, metadata, arrays


def read_header_file(path: str | Path, *, require_metadata: bool = True) -> dict[str, Any]:
    """The header of an adapter file on disk: ``{"tensors": {name: {"dtype", "shape"}}, "metadata"}``.

    `metadata` is the parsed ``__metadata__["difffit"]`` JSON. Raises
    InvalidRequest saying what is wrong when safetensors refuses the file
    (truncated, malformed, trailing bytes) or the DiffFit metadata is missing
    or not a JSON object (unless `require_metadata` is False: then ``{}``).
    This reads the container only; :func:`validate` checks the adapter.
    """
    infos, metadata = _open(Path(path), require_metadata)
    return {"tensors": infos, "metadata": metadata}


def read_header(data: bytes, *, require_metadata: bool = True) -> dict[str, Any]:
    """Like :func:`read_header_file` for a file held in memory."""
    infos, metadata, _ = _parse_bytes(data, require_metadata)
    return {"tensors": infos, "metadata": metadata}


def read_adapter(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors (float32 numpy arrays) and metadata of an adapter file; :func:`validate`d."""
    infos, metadata, arrays = _parse_bytes(data, True)
    validate({"tensors": infos, "metadata": metadata})
    check_finite(arrays)
    return arrays, metadata


# -- validation -----------------------------------------------------------------------
def validate(header: dict[str, Any]) -> None:
    """Raise InvalidRequest unless `header` (as read above) is a DiffFit adapter.

    Checks: metadata format and version, every key of REQUIRED_METADATA,
    num_classes == len(class_names); every tensor named by the naming rule,
    float32, vectors for bias/gamma, a class table of num_classes + 1 rows
    and each gamma next to its layer's bias.
    """
    meta = header["metadata"]
    if meta.get("format") != FORMAT:
        raise InvalidRequest(f"not a DiffFit adapter file (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(f"format_version {meta.get('format_version')!r}; this service reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise _fail(f"metadata lacks {', '.join(missing)}")
    names = meta["class_names"]
    if not isinstance(names, list) or meta["num_classes"] != len(names):
        raise _fail(f"metadata num_classes {meta['num_classes']!r} does not match its class_names")
    tensors = header["tensors"]
    if CLASS_TABLE not in tensors:
        raise _fail(f"it has no {CLASS_TABLE!r} tensor")
    for name, info in tensors.items():
        layer, kind = split_name(name)
        if info["dtype"] != DTYPE:
            raise _fail(f"tensor {name!r} is {info['dtype']}; adapter tensors are {DTYPE}")
        shape = info["shape"]
        if kind == CLASS_TABLE:
            if len(shape) != 2 or shape[0] != meta["num_classes"] + 1:
                raise _fail(
                    f"class_table has shape {tuple(shape)}; metadata says "
                    f"{meta['num_classes']} classes + the null row"
                )
        elif len(shape) != 1:
            raise _fail(f"tensor {name!r} has shape {tuple(shape)}; {kind} tensors are vectors")
        elif kind == "gamma" and tensor_name(layer, "bias") not in tensors:
            raise _fail(f"tensor {name!r} has no {tensor_name(layer, 'bias')!r} beside it")


def check_finite(arrays: dict[str, np.ndarray]) -> None:
    """Raise InvalidRequest naming the first tensor holding a NaN or an infinity."""
    import numpy as np

    # One pass over all values (an adapter has hundreds of small tensors; a call
    # per tensor costs more than the check), and the per-tensor pass only to name one.
    if not arrays or np.isfinite(np.concatenate([v.reshape(-1) for v in arrays.values()])).all():
        return
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            raise _fail(f"tensor {name!r} holds NaN or infinite values")


def check_shapes(
    shapes: dict[str, tuple[int, ...]],
    spec: dict[str, tuple[int | None, ...]],
    required: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Raise IncompatibleAdapter unless every tensor fits a base's `spec`.

    `spec` maps each allowed name to its shape (``None``: any size on that
    axis); `required` names must be present. Messages name the first misfit.
    """
    missing = sorted(n for n in required if n not in shapes)
    if missing:
        raise IncompatibleAdapter(f"adapter lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, shape in shapes.items():
        want = spec.get(name)
        if want is None:
            layer, kind = name.rpartition(".")[0], name.rpartition(".")[2]
            if kind == "gamma" and tensor_name(layer, "bias") in spec:
                raise IncompatibleAdapter(f"gamma is not allowed on {layer}")
            raise IncompatibleAdapter(f"adapter tensor {name!r} matches no layer of the base model")
        shape = tuple(shape)
        if shape == want:
            continue
        fits = len(shape) == len(want) and all(w is None or w == s for w, s in zip(want, shape, strict=True))
        if not fits:
            expected = tuple("*" if w is None else w for w in want)
            raise IncompatibleAdapter(f"{name} has shape {shape}; the base expects {expected}")
