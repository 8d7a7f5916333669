"""The worker runtime: registry checks, content-hash slots, stale adapters."""

from __future__ import annotations

import base64

import pytest

from core.adapter.file import adapter_metadata, save_adapter
from difffit.contract import AdapterRef, GenerateTask, Placement
from difffit.errors import AdapterNotFound, CorruptBlob, InvalidRequest
from tests.conftest import random_adapter
from worker.runtime import Runtime


def _register(rt: Runtime, tenant_id: int, name: str, seed: int):
    tensors = random_adapter(rt.engine.model, Placement(), 3, seed=seed)
    meta = adapter_metadata(
        base_model=rt.base.model_id, base_hash=rt.base.content_hash, method="difffit",
        placement=Placement().model_dump(), class_names=["a", "b", "c"], resolution=8,
    )  # fmt: skip
    blob = save_adapter(tensors, meta)
    sha = rt.blobs.put_bytes(blob)
    return rt.registry.add_version(
        tenant_id, name, sha256=sha, size_bytes=len(blob), method="difffit",
        base_model_hash=rt.base.content_hash, class_names=["a", "b", "c"], resolution=8,
        trainable_params=1, metadata=meta,
    )  # fmt: skip


def _generate(rt: Runtime, ref: AdapterRef | None, label: int = 1) -> list[bytes]:
    task = GenerateTask(request_id="t", adapter=ref, class_labels=[label], seed=5, steps=3)
    return [base64.b64decode(s) for s in rt.generate(task).images_png_b64]


def _ref(v, tenant_id):
    return AdapterRef(name=v.name, version=v.version, sha256=v.sha256, tenant_id=tenant_id)


def test_replaced_and_deleted_adapters_are_never_served_from_a_stale_slot(runtime):
    tenant = runtime.registry.create_tenant("acme")
    v1 = _register(runtime, tenant.id, "fungi", seed=1)
    first = _generate(runtime, _ref(v1, tenant.id))
    v2 = _register(runtime, tenant.id, "fungi", seed=2)  # same name, new content
    assert v2.sha256 != v1.sha256
    second = _generate(runtime, _ref(v2, tenant.id))
    assert second != first  # v2's tensors, not v1's warm slot
    assert _generate(runtime, _ref(v1, tenant.id)) == first  # v1 pinned by version still works
    assert runtime.engine.bank.resident(v1.sha256) and runtime.engine.bank.resident(v2.sha256)

    runtime.registry.delete_adapter(tenant.id, "fungi")
    with pytest.raises(AdapterNotFound):
        _generate(runtime, _ref(v2, tenant.id))  # resident in the bank, but deleted


def test_class_range_and_resolution_are_checked(runtime):
    with pytest.raises(InvalidRequest, match="classes 0..9"):
        _generate(runtime, None, label=10)
    with pytest.raises(InvalidRequest, match="multiple of 2"):
        runtime.latent_size(7)
    assert runtime.latent_size(16) == 16


def test_corrupt_blob_is_refused_and_the_registry_is_unchanged(runtime):
    tenant = runtime.registry.create_tenant("acme")
    v = _register(runtime, tenant.id, "fungi", seed=3)
    path = runtime.blobs.path_for(v.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlob):
        _generate(runtime, _ref(v, tenant.id))
    assert runtime.registry.get_version(tenant.id, "fungi").sha256 == v.sha256
