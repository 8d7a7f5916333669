"""The adapter file format (difffit.adapter_format): reading, validation, shapes; no torch needed."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as np_save

from adapters_store import read_header as store_read_header
from difffit import adapter_format as fmt
from difffit.adapter_format import adapter_metadata, check_shapes, read_adapter, read_header, read_header_file
from difffit.errors import IncompatibleAdapter, InvalidRequest

REPO = Path(__file__).resolve().parents[2]
META = {"method": "difffit", "base_model_hash": "abc", "class_names": ["a", "b"]}


@pytest.fixture(scope="module")
def mixed_bytes() -> bytes:
    """A safetensors file written by the library itself, with several dtypes."""
    torch = pytest.importorskip("torch")  # numpy has no bfloat16: torch's writer makes one
    from safetensors.torch import save

    tensors = {
        "blocks.0.attn.qkv.gamma": torch.ones(24),
        "blocks.0.attn.qkv.bias": torch.zeros(24, dtype=torch.bfloat16),
        "class_table": torch.randn(3, 8, dtype=torch.float16),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    return save(tensors, metadata={"difffit": json.dumps(META)})


def _meta(classes: int = 2, **over) -> dict:
    meta = adapter_metadata(
        base_model="tiny", base_hash="0" * 64, method="difffit", placement={"qkv": "all"},
        class_names=[f"c{i}" for i in range(classes)], resolution=8,
    )  # fmt: skip
    return {**meta, **over}


F32, F16 = np.float32, np.float16


def _adapter(classes: int = 2, **tensors) -> dict[str, np.ndarray]:
    out = {
        "proj_out_2.bias": np.zeros(4, np.float32),
        "proj_out_2.gamma": np.ones(4, np.float32),
        "class_table": np.zeros((classes + 1, 6), np.float32),
    }
    return {**out, **tensors}


def _file(tensors: dict, meta: dict) -> bytes:
    return np_save(tensors, metadata=fmt.encode_metadata(meta))


# -- the container, read by safetensors -------------------------------------------------
def test_reads_real_safetensors(mixed_bytes: bytes) -> None:
    header = read_header(mixed_bytes)
    assert header["metadata"] == META
    assert header["tensors"] == {
        "blocks.0.attn.qkv.gamma": {"dtype": "F32", "shape": [24]},
        "blocks.0.attn.qkv.bias": {"dtype": "BF16", "shape": [24]},
        "class_table": {"dtype": "F16", "shape": [3, 8]},
        "step": {"dtype": "I64", "shape": [1]},
    }
    assert store_read_header(mixed_bytes) == header  # the store re-exports this module


def test_read_header_file_matches(mixed_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(mixed_bytes)
    assert read_header_file(path) == read_header(mixed_bytes)
    path.write_bytes(mixed_bytes[:-1])
    with pytest.raises(InvalidRequest):
        read_header_file(path)


@pytest.mark.parametrize("cut", [0, 3, 8, 20, -1, -100])
def test_truncated_input_refused(mixed_bytes: bytes, cut: int) -> None:
    with pytest.raises(InvalidRequest, match="not a valid adapter file"):
        read_header(mixed_bytes[:cut])


def test_extra_trailing_bytes_refused(mixed_bytes: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not a valid adapter file.*covered"):
        read_header(mixed_bytes + b"\x00" * 4)


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
    with pytest.raises(InvalidRequest, match="not a valid adapter file"):
        read_header(garbage)


def _build(header: dict, data: bytes = b"") -> bytes:
    """A hand-made container, to feed the reader what safetensors' writer never writes."""
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
        "overlap": {
            "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "u": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        },
    }
    for case, tensors in cases.items():
        with pytest.raises(InvalidRequest, match="not a valid adapter file"):
            read_header(_build({**meta, **tensors}, b"\0" * 8))
            pytest.fail(f"accepted a header with bad {case}")


def test_metadata_checks() -> None:
    tensor = {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    no_meta = _build(tensor, b"\0")
    with pytest.raises(InvalidRequest, match="not a DiffFit adapter"):
        read_header(no_meta)
    assert read_header(no_meta, require_metadata=False)["metadata"] == {}
    for bad in ({"difffit": "{not json"}, {"difffit": "[1, 2]"}, {"difffit": 3}):
        with pytest.raises(InvalidRequest, match=r"difffit|__metadata__|not a valid adapter file"):
            read_header(_build({"__metadata__": bad, **tensor}, b"\0"))


# -- what makes it a DiffFit adapter ----------------------------------------------------
def test_valid_adapter_round_trips_through_numpy() -> None:
    tensors = _adapter()
    tensors["class_table"] = np.arange(18, dtype=np.float32).reshape(3, 6)
    arrays, meta = read_adapter(_file(tensors, _meta()))
    assert meta == _meta()
    assert set(arrays) == set(tensors)
    assert all(np.array_equal(arrays[k], tensors[k]) and arrays[k].dtype == np.float32 for k in tensors)


@pytest.mark.parametrize(
    ("tensors", "meta", "reason"),
    [
        (_adapter(**{"proj_out_2.bias": np.zeros(4, F16)}), _meta(), "is F16; adapter tensors are F32"),
        (_adapter(**{"proj_out_2.weight": np.zeros(4, F32)}), _meta(), "'proj_out_2.weight' is neither"),
        (_adapter(**{"proj_out_2.bias": np.zeros((2, 2), F32)}), _meta(), "bias tensors are vectors"),
        (_adapter(**{"x.gamma": np.ones(4, F32)}), _meta(), "has no 'x.bias' beside it"),
        (_adapter(classes=3), _meta(classes=2), "class_table has shape \\(4, 6\\); metadata says 2"),
        ({"proj_out_2.bias": np.zeros(4, np.float32)}, _meta(), "no 'class_table'"),
        (_adapter(**{"proj_out_2.gamma": np.array([1, np.nan, 1, 1], np.float32)}), _meta(), "NaN or inf"),
        (_adapter(**{"class_table": np.full((3, 6), np.inf, F32)}), _meta(), "'class_table' holds NaN"),
        (_adapter(), _meta(format="other"), "not a DiffFit adapter file"),
        (_adapter(), _meta(format_version=2), "format_version 2"),
        (_adapter(), {k: v for k, v in _meta().items() if k != "base_hash"}, "metadata lacks base_hash"),
        (_adapter(), _meta(num_classes=5), "num_classes 5 does not match"),
    ],
)
def test_invalid_adapters_are_refused_with_their_reason(tensors, meta, reason) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        read_adapter(_file(tensors, meta))


def test_check_shapes_against_a_base_spec() -> None:
    spec = {"a.bias": (4,), "a.gamma": (4,), "b.bias": (3,), "class_table": (None, 6)}
    required = {"a.bias", "b.bias", "class_table"}
    check_shapes({"a.bias": (4,), "b.bias": (3,), "class_table": (11, 6)}, spec, required)
    ok = {"a.bias": (4,), "b.bias": (3,), "class_table": (3, 6)}
    cases = [
        ({"a.bias": (4,), "class_table": (3, 6)}, "lacks 1 tensors, e.g. b.bias"),
        ({**ok, "a.bias": (5,)}, r"a.bias has shape \(5,\); the base expects \(4,\)"),
        ({**ok, "class_table": (3, 7)}, r"expects \('\*', 6\)"),
        ({**ok, "b.gamma": (3,)}, "gamma is not allowed on b"),
        ({**ok, "c.bias": (3,)}, "'c.bias' matches no layer"),
    ]
    for shapes, reason in cases:
        with pytest.raises(IncompatibleAdapter, match=reason):
            check_shapes(shapes, spec, required)


def test_names_follow_one_rule() -> None:
    layer = "transformer_blocks.0.attn1.to_q"
    assert fmt.tensor_name(layer, "gamma") == f"{layer}.gamma"
    assert fmt.split_name("proj_out_2.bias") == ("proj_out_2", "bias")
    assert fmt.split_name("class_table") == ("", "class_table")
    with pytest.raises(ValueError, match="kind"):
        fmt.tensor_name("x", "scale")
    for bad in ("bias", ".bias", "x.weight"):
        with pytest.raises(InvalidRequest):
            fmt.split_name(bad)


def test_reading_stays_torch_free(tmp_path: Path) -> None:
    # Importing is cheap (safetensors and numpy load on first use); reading and
    # validating a whole adapter goes through safetensors' numpy API, never torch.
    path = tmp_path / "a.safetensors"
    path.write_bytes(_file(_adapter(), _meta()))
    code = (
        "import sys, adapters_store, adapters_store.registry, adapters_store.blobstore.s3, "
        "adapters_store.lifecycle, adapters_store.gc; "
        "import difffit.adapter_format as f; "
        "bad = [m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules]; "
        "assert not bad, ('imported at import time', bad); "
        f"arrays, meta = f.read_adapter(open({str(path)!r}, 'rb').read()); "
        "assert sorted(arrays) == ['class_table', 'proj_out_2.bias', 'proj_out_2.gamma'], sorted(arrays); "
        "assert 'torch' not in sys.modules, 'reading imported torch'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
