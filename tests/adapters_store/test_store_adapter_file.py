"""Adapter file header parsing, against files written by safetensors itself."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from adapters_store import read_header, read_header_file
from difffit.errors import InvalidRequest

META = {"method": "difffit", "base_model_hash": "abc", "class_names": ["a", "b"]}


@pytest.fixture(scope="module")
def adapter_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    tensors = {
        "blocks.0.attn.qkv.gamma": torch.ones(24),
        "blocks.0.attn.qkv.bias": torch.zeros(24, dtype=torch.bfloat16),
        "class_table": torch.randn(3, 8, dtype=torch.float16),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    return save(tensors, metadata={"difffit": json.dumps(META)})


def test_reads_real_safetensors(adapter_bytes: bytes) -> None:
    header = read_header(adapter_bytes)
    assert header["metadata"] == META
    assert header["tensors"] == {
        "blocks.0.attn.qkv.gamma": {"dtype": "F32", "shape": [24]},
        "blocks.0.attn.qkv.bias": {"dtype": "BF16", "shape": [24]},
        "class_table": {"dtype": "F16", "shape": [3, 8]},
        "step": {"dtype": "I64", "shape": [1]},
    }


def test_read_header_file_matches(adapter_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(adapter_bytes)
    assert read_header_file(path) == read_header(adapter_bytes)
    path.write_bytes(adapter_bytes[:-1])
    with pytest.raises(InvalidRequest):
        read_header_file(path)


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1, -100])
def test_truncated_input_refused(adapter_bytes: bytes, cut: int) -> None:
    with pytest.raises(InvalidRequest, match="not a valid adapter file"):
        read_header(adapter_bytes[:cut])


def test_extra_trailing_bytes_refused(adapter_bytes: bytes) -> None:
    with pytest.raises(InvalidRequest, match="cover"):
        read_header(adapter_bytes + b"\x00" * 4)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 8,
        b"\xff" * 64,
        b"PK\x03\x04" + b"\x00" * 60,
        struct.pack("<Q", 5) + b"{]{]{",
        struct.pack("<Q", 4) + b"[1] ",
        struct.pack("<Q", 4) + b"\xff\xfe{}",
    ],
)
def test_garbage_refused(garbage: bytes) -> None:
    with pytest.raises(InvalidRequest):
        read_header(garbage)


def _build(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_header_checks() -> None:
    meta = {"__metadata__": {"difffit": json.dumps(META)}}
    ok = _build({**meta, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert read_header(ok)["tensors"] == {"t": {"dtype": "F32", "shape": [2]}}
    cases = {
        "dtype": {"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
        "shape": {"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        "offsets": {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}},
        "needs": {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        "starts": {
            "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "u": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        },
    }
    for word, tensors in cases.items():
        with pytest.raises(InvalidRequest, match=word):
            read_header(_build({**meta, **tensors}, b"\0" * 8))


def test_metadata_checks() -> None:
    tensor = {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    no_meta = _build(tensor, b"\0")
    with pytest.raises(InvalidRequest, match="not a DiffFit adapter"):
        read_header(no_meta)
    assert read_header(no_meta, require_metadata=False)["metadata"] == {}
    for bad in ({"difffit": "{not json"}, {"difffit": "[1, 2]"}, {"difffit": 3}):
        with pytest.raises(InvalidRequest, match=r"difffit|__metadata__"):
            read_header(_build({"__metadata__": bad, **tensor}, b"\0"))


def test_package_import_stays_torch_free() -> None:
    code = (
        "import sys, adapters_store, adapters_store.registry, adapters_store.blobstore.s3, "
        "adapters_store.lifecycle, adapters_store.gc, "
        "adapters_store.adapter_file; "
        "bad = [m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
