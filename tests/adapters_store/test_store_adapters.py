"""Registry: adapters, immutable versions, isolation and concurrent numbering."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import text

from adapters_store import AdapterRecord, Registry, VersionRecord
from difffit.errors import AdapterNotFound, InvalidRequest, TenantNotFound

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def test_add_and_get_versions(registry: Registry, vkw: Any) -> None:
    t = registry.create_tenant("acme")
    v1 = registry.add_version(t.id, "fungi", **vkw(job_id="j1", files={"grid.png": SHA_C}))
    assert isinstance(v1, VersionRecord)
    assert (v1.name, v1.version, v1.sha256, v1.num_classes) == ("fungi", 1, SHA_A, 3)
    assert v1.files == {"grid.png": SHA_C} and v1.job_id == "j1"
    assert v1.metadata == {"objective": "standard", "lr": 0.001}
    v2 = registry.add_version(t.id, "fungi", **vkw(sha256=SHA_B, class_names=["x"]))
    assert v2.version == 2 and v2.num_classes == 1 and v2.files == {}

    assert registry.get_version(t.id, "fungi") == v2
    assert registry.get_version(t.id, "fungi", 1) == v1
    adapter = registry.get_adapter(t.id, "fungi")
    assert isinstance(adapter, AdapterRecord)
    assert adapter.latest_version == 2 and adapter.versions == [v1, v2]
    assert adapter.latest == v2


def test_missing_version_names_it(registry: Registry, vkw: Any) -> None:
    t = registry.create_tenant("acme")
    registry.add_version(t.id, "fungi", **vkw())
    with pytest.raises(AdapterNotFound, match=r"no version 7 \(latest is 1\)"):
        registry.get_version(t.id, "fungi", 7)
    with pytest.raises(AdapterNotFound, match="'nope'"):
        registry.get_version(t.id, "nope")
    with pytest.raises(AdapterNotFound, match="'nope'"):
        registry.get_adapter(t.id, "nope")


def test_list_adapters_sorted_and_scoped(registry: Registry, vkw: Any) -> None:
    a = registry.create_tenant("a")
    b = registry.create_tenant("b")
    registry.add_version(a.id, "zebra", **vkw())
    registry.add_version(a.id, "apple", **vkw())
    registry.add_version(a.id, "apple", **vkw(sha256=SHA_B))
    registry.add_version(b.id, "other", **vkw())
    listed = registry.list_adapters(a.id)
    assert [x.name for x in listed] == ["apple", "zebra"]
    assert [x.latest_version for x in listed] == [2, 1]
    assert [x.name for x in registry.list_adapters(b.id)] == ["other"]
    assert registry.list_adapters(9999) == []


def test_tenant_isolation(registry: Registry, vkw: Any) -> None:
    a = registry.create_tenant("a")
    b = registry.create_tenant("b")
    registry.add_version(a.id, "fungi", **vkw())
    # B sees exactly what it would see for a name nobody uses.
    with pytest.raises(AdapterNotFound) as err:
        registry.get_adapter(b.id, "fungi")
    with pytest.raises(AdapterNotFound) as err_missing:
        registry.get_adapter(b.id, "missing")
    assert err.value.message.replace("fungi", "X") == err_missing.value.message.replace("missing", "X")
    with pytest.raises(AdapterNotFound):
        registry.get_version(b.id, "fungi", 1)
    with pytest.raises(AdapterNotFound):
        registry.delete_adapter(b.id, "fungi")
    # B may use the same name independently, with its own numbering.
    assert registry.add_version(b.id, "fungi", **vkw(sha256=SHA_B)).version == 1
    assert registry.get_version(a.id, "fungi").sha256 == SHA_A
    assert registry.get_version(b.id, "fungi").sha256 == SHA_B


def test_delete_adapter(registry: Registry, vkw: Any) -> None:
    t = registry.create_tenant("acme")
    registry.add_version(t.id, "fungi", **vkw(files={"grid.png": SHA_C}))
    registry.add_version(t.id, "fungi", **vkw(sha256=SHA_B, files={"grid.png": SHA_C}))
    registry.add_version(t.id, "keep", **vkw())
    shas = registry.delete_adapter(t.id, "fungi")
    assert sorted(shas) == [SHA_A, SHA_B, SHA_C] and len(shas) == 3
    with pytest.raises(AdapterNotFound):
        registry.get_adapter(t.id, "fungi")
    with pytest.raises(AdapterNotFound):
        registry.delete_adapter(t.id, "fungi")
    # Version rows went with it; the other adapter is untouched.
    with registry._db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM adapter_versions")).scalar() == 1
    assert registry.get_version(t.id, "keep").version == 1
    # The name is free again and numbering restarts.
    assert registry.add_version(t.id, "fungi", **vkw()).version == 1


def test_blob_in_use(registry: Registry, vkw: Any) -> None:
    t = registry.create_tenant("acme")
    registry.add_version(t.id, "one", **vkw(files={"loss.png": SHA_C}))
    registry.add_version(t.id, "two", **vkw())
    assert registry.blob_in_use(SHA_A) and registry.blob_in_use(SHA_C)
    assert not registry.blob_in_use(SHA_B)
    registry.delete_adapter(t.id, "one")
    assert registry.blob_in_use(SHA_A)  # still referenced by "two"
    assert not registry.blob_in_use(SHA_C)
    job, _ = registry.create_job(t.id, "two", {}, 10)
    registry.update_job(job.id, checkpoint_sha256=SHA_B, checkpoint_step=5)
    assert registry.blob_in_use(SHA_B)


def test_add_version_validation(registry: Registry, vkw: Any) -> None:
    t = registry.create_tenant("acme")
    bad: list[dict[str, Any]] = [
        {"sha256": "A" * 64},
        {"sha256": "../" + "a" * 61},
        {"size_bytes": -1},
        {"resolution": 0},
        {"class_names": []},
        {"class_names": ["a", 3]},
        {"files": {"grid.png": "nothex"}},
        {"metadata": {"x": object()}},
        {"method": ""},
    ]
    for override in bad:
        with pytest.raises(InvalidRequest):
            registry.add_version(t.id, "fungi", **vkw(**override))
    with pytest.raises(InvalidRequest):
        registry.add_version(t.id, "Bad Name", **vkw())
    with pytest.raises(TenantNotFound):
        registry.add_version(424242, "fungi", **vkw())
    assert registry.list_adapters(t.id) == []


def test_concurrent_add_version_gives_consecutive_numbers(registry: Registry, vkw: Any) -> None:
    t = registry.create_tenant("acme")
    threads_n, per_thread = 6, 3
    results: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def work(i: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                v = registry.add_version(t.id, "race", **vkw(metadata={"who": i, "n": j}))
                with lock:
                    results.append(v.version)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    total = threads_n * per_thread
    assert sorted(results) == list(range(1, total + 1))
    adapter = registry.get_adapter(t.id, "race")
    assert [v.version for v in adapter.versions] == list(range(1, total + 1))
    whos = {(v.metadata["who"], v.metadata["n"]) for v in adapter.versions}
    assert len(whos) == total
