"""The adapter file, torch side: adapter tensors <-> the bytes of one ``.safetensors``.

Names, metadata and validation are :mod:`difffit.adapter_format`'s (torch-free,
so the API side reads the same format); this module only converts tensors.
Every file is validated before it is written and when it is read.
"""

from __future__ import annotations

import torch
from safetensors.torch import save as st_save

from difffit import adapter_format as fmt
from difffit.adapter_format import adapter_metadata
from difffit.errors import IncompatibleAdapter, InvalidRequest, TrainingFailed

__all__ = ["adapter_metadata", "load_adapter", "save_adapter"]


def save_adapter(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """Serialize adapter tensors (stored as float32) and metadata to bytes.

    Raises ValueError when tensors and metadata do not make a valid adapter
    (a bug of the caller) and TrainingFailed when a tensor is not finite.
    """
    flat = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    header = {
        "tensors": {k: {"dtype": fmt.DTYPE, "shape": list(v.shape)} for k, v in flat.items()},
        "metadata": metadata,
    }
    try:
        fmt.validate(header)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None
    try:
        fmt.check_finite({k: v.numpy() for k, v in flat.items()})
    except InvalidRequest as exc:
        raise TrainingFailed(f"the trained adapter is unusable: {exc.message}") from None
    return st_save(flat, metadata=fmt.encode_metadata(metadata))


def load_adapter(data: bytes, base_hash: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse and validate an adapter file; refuse one made for another base (hash mismatch)."""
    arrays, meta = fmt.read_adapter(data)
    if base_hash is not None and meta.get("base_hash") != base_hash:
        raise IncompatibleAdapter(
            f"adapter was trained on base {meta.get('base_model')!r} with content hash "
            f"{str(meta.get('base_hash'))[:12]}...; this worker serves hash {base_hash[:12]}..."
        )
    # Each array owns a fresh buffer (read_adapter), so the tensors share it without a copy.
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, meta
