"""POST /adapters/{name}/versions: adapter files checked against the base the workers publish.

Files are written with safetensors' numpy API in the project's format; the
e2e test in tests/e2e/tenant/ imports a file a real job trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from difffit.contract import AdapterSpec

from .conftest import worker_stats

BASE_HASH = "c" * 64
SPEC = AdapterSpec(
    layers={"pos_embed.proj": 8, "transformer_blocks.0.attn1.to_q": 8, "proj_out_2": 4},
    gamma_layers=["transformer_blocks.0.attn1.to_q", "proj_out_2"],
    hidden_size=8,
    max_classes=5,
    resolution=8,
    resolution_unit=2,
)


def adapter_file(classes=("amanita", "boletus"), base_hash=BASE_HASH, tweak=None) -> bytes:
    tensors = {f"{name}.bias": np.full(width, 0.1, np.float32) for name, width in SPEC.layers.items()}
    tensors["transformer_blocks.0.attn1.to_q.gamma"] = np.ones(8, np.float32)
    tensors["class_table"] = np.arange((len(classes) + 1) * 8, dtype=np.float32).reshape(-1, 8)
    meta = {
        "format": "difffit-adapter", "format_version": 1, "base_model": "tiny", "base_hash": base_hash,
        "method": "difffit", "placement": {}, "class_names": list(classes), "num_classes": len(classes),
        "resolution": 8, "training": {}, "trainable_params": None,
    }  # fmt: skip
    if tweak:
        tweak(tensors, meta)
    return save(tensors, metadata={"difffit": json.dumps(meta)})


@pytest.fixture
def spec_worker(fake_queue):
    fake_queue.workers = [worker_stats(base_hash=BASE_HASH, adapter_spec=SPEC)]
    return fake_queue


def _blobs(settings) -> list[Path]:
    return [p for p in settings.resolved_blob_dir.rglob("*") if p.is_file()]


def test_import_registers_immutable_versions_that_download_as_uploaded(client, acme, other, spec_worker):
    data = adapter_file()
    r = client.post("/adapters/fungi/versions", headers=acme.headers, files={"file": ("a.safetensors", data)})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["version"] == 1 and v["class_names"] == ["amanita", "boletus"] and v["job_id"] is None
    assert v["base_model_hash"] == BASE_HASH and v["trainable_params"] == 8 + 8 + 4 + 8 + 3 * 8
    raw = {**acme.headers, "Content-Type": "application/octet-stream"}
    assert client.post("/adapters/fungi/versions", headers=raw, content=data).json()["version"] == 2
    r = client.get(v["file_urls"]["adapter.safetensors"], headers=acme.headers)
    assert r.status_code == 200 and r.content == data
    assert client.get("/adapters/fungi", headers=other.headers).status_code == 404
    # Generating from it works like from a trained version: class names resolve.
    r = client.post("/generate", headers=acme.headers, params={"adapter": "fungi", "class": "boletus"})
    assert r.status_code == 200 and spec_worker.generated[-1].adapter.sha256 == v["sha256"]


def _nan(t, m):
    t["proj_out_2.bias"][1] = np.nan


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (adapter_file(base_hash="d" * 64), "incompatible-adapter", "trained on base"),
        (
            adapter_file(tweak=lambda t, m: t.pop("proj_out_2.bias")),
            "incompatible-adapter",
            "lacks 1 tensors, e.g. proj_out_2.bias",
        ),
        (
            adapter_file(tweak=lambda t, m: t.update({"proj_out_2.bias": np.zeros(5, np.float32)})),
            "incompatible-adapter",
            "the base expects (4,)",
        ),
        (
            adapter_file(tweak=lambda t, m: t.update({"pos_embed.proj.gamma": np.ones(8, np.float32)})),
            "incompatible-adapter",
            "gamma is not allowed",
        ),
        (
            adapter_file(tweak=lambda t, m: t.update({"extra.bias": np.ones(2, np.float32)})),
            "incompatible-adapter",
            "no layer",
        ),
        (adapter_file(classes=list("abcdefg")), "incompatible-adapter", "at most 5"),
        (
            adapter_file(tweak=lambda t, m: t.update({"class_table": np.zeros((3, 9), np.float32)})),
            "incompatible-adapter",
            "class_table has shape (3, 9); the base expects ('*', 8)",
        ),
        (adapter_file(tweak=_nan), "invalid-request", "NaN or infinite"),
        (
            adapter_file(tweak=lambda t, m: t.update({"proj_out_2.bias": np.zeros(4, np.float16)})),
            "invalid-request",
            "adapter tensors are F32",
        ),
        (adapter_file(tweak=lambda t, m: m.update(format="lora")), "invalid-request", "format 'lora'"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "invalid-request", "not a valid adapter file"),
    ],
    ids=[
        "base-hash",
        "missing-bias",
        "shape",
        "gamma",
        "unknown",
        "classes",
        "table",
        "nan",
        "dtype",
        "format",
        "junk",
    ],
)
def test_files_that_do_not_fit_the_base_are_refused_and_leave_nothing(
    client, acme, settings, registry, spec_worker, assert_problem, data, code, words
):
    r = client.post("/adapters/fungi/versions", headers=acme.headers, files={"file": ("a.safetensors", data)})
    body = assert_problem(r, 422, code)
    assert words in body["detail"], body["detail"]
    assert _blobs(settings) == [] and registry.list_adapters(acme.record.id) == []


def test_too_large_is_413_and_no_worker_is_503(
    make_client, settings, registry, fake_queue, acme, assert_problem
):
    fake_queue.workers = []
    with make_client(settings, registry, fake_queue) as client:
        r = client.post(
            "/adapters/fungi/versions", headers=acme.headers, files={"file": ("a", adapter_file())}
        )
    assert_problem(r, 503, "backend-unavailable")
    fake_queue.workers = [worker_stats(base_hash=BASE_HASH, adapter_spec=SPEC)]
    small = settings.model_copy(update={"adapter_max_bytes": 100})
    with make_client(small, registry, fake_queue) as client:
        r = client.post(
            "/adapters/fungi/versions", headers=acme.headers, files={"file": ("a", adapter_file())}
        )
    assert_problem(r, 413, "payload-too-large")
    assert _blobs(settings) == [] and registry.list_adapters(acme.record.id) == []
