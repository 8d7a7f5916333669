"""The adapter file: one ``.safetensors`` with a JSON metadata header.

Tensors are named as in :mod:`core.adapter.model`; the safetensors
``__metadata__`` carries one key, ``"difffit"``, a JSON object with the base
model id and content hash, method, placement, class names, resolution and
training settings. The header is readable without torch
(:func:`adapters_store.adapter_file.read_header`), so the service can
inspect files too.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store.adapter_file import read_header
from difffit.errors import IncompatibleAdapter, InvalidRequest

FORMAT = "difffit-adapter"
FORMAT_VERSION = 1


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


def save_adapter(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """Serialize adapter tensors (stored as float32) and metadata to bytes."""
    table = tensors.get("class_table")
    if table is not None and table.shape[0] != metadata["num_classes"] + 1:
        raise ValueError(
            f"class_table has {table.shape[0]} rows; metadata says {metadata['num_classes']} classes + null"
        )
    flat = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata={"difffit": json.dumps(metadata, sort_keys=True)})


def load_adapter(data: bytes, base_hash: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse an adapter file; refuse one made for another base (hash mismatch)."""
    header = read_header(data)
    meta = header["metadata"]
    if meta.get("format") != FORMAT:
        raise InvalidRequest(f"not a DiffFit adapter file (format {meta.get('format')!r})")
    if base_hash is not None and meta.get("base_hash") != base_hash:
        raise IncompatibleAdapter(
            f"adapter was trained on base {meta.get('base_model')!r} with content hash "
            f"{str(meta.get('base_hash'))[:12]}...; this worker serves hash {base_hash[:12]}..."
        )
    return st_load(data), meta
