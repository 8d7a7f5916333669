"""Blob lifecycle: deletes free unshared blobs, purges leave nothing, checkpoints end with their job.

Every case runs on each registry backend (SQLite, PostgreSQL) with each
store (folder, S3 on the moto server); what is left is looked at behind the
store's back (`everything_in`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from adapters_store import BlobStore, Registry, lifecycle
from difffit.errors import AdapterNotFound, TenantNotFound
from tests.s3 import everything_in


def _put(store: BlobStore, label: str) -> str:
    return store.put_bytes(f"blob {label}".encode())


def _version(registry: Registry, store: BlobStore, tenant_id: int, name: str, vkw: Any, **files: str) -> Any:
    """A version with a fresh adapter blob and the given attached files."""
    sha = _put(store, f"{tenant_id}/{name}/{time.monotonic_ns()}")
    return registry.add_version(tenant_id, name, **vkw(sha256=sha, files=files))


def _names(store: BlobStore, *shas: str) -> set[str]:
    """The names `everything_in` shows for these blobs."""
    prefix = "blobs/" if store.url.startswith("s3://") else ""
    return {f"{prefix}{s[:2]}/{s[2:4]}/{s}" for s in shas}


def test_delete_version_frees_its_unshared_blobs_and_never_reuses_its_number(
    registry: Registry, blob_store: BlobStore, vkw: Any
) -> None:
    t = registry.create_tenant("acme").id
    shared = _put(blob_store, "grid shared by v1 and v2")
    v1 = _version(registry, blob_store, t, "fungi", vkw, **{"samples.png": shared})
    v2 = _version(registry, blob_store, t, "fungi", vkw, **{"samples.png": shared})
    v3 = _version(registry, blob_store, t, "fungi", vkw, **{"loss.json": _put(blob_store, "loss v3")})

    freed = lifecycle.delete_version(registry, blob_store, t, "fungi", 3)
    assert set(freed) == {v3.sha256, v3.files["loss.json"]}
    freed = lifecycle.delete_version(registry, blob_store, t, "fungi", 1)
    assert freed == [v1.sha256]  # the grid is still v2's
    assert set(everything_in(blob_store)) == _names(blob_store, v2.sha256, shared)
    # Number 3 was given once: the next version is 4, not 3 again.
    assert _version(registry, blob_store, t, "fungi", vkw).version == 4
    with pytest.raises(AdapterNotFound, match="no version 3"):
        lifecycle.delete_version(registry, blob_store, t, "fungi", 3)
    # Deleting the last version deletes the adapter.
    lifecycle.delete_version(registry, blob_store, t, "fungi", 2)
    lifecycle.delete_version(registry, blob_store, t, "fungi", 4)
    with pytest.raises(AdapterNotFound):
        registry.get_adapter(t, "fungi")
    assert everything_in(blob_store) == []


def test_delete_adapter_keeps_blobs_other_tenants_share(
    registry: Registry, blob_store: BlobStore, vkw: Any
) -> None:
    a, b = registry.create_tenant("acme").id, registry.create_tenant("globex").id
    grid = _put(blob_store, "identical sample grid")  # content addressing shares it
    mine = _version(registry, blob_store, a, "fungi", vkw, **{"samples.png": grid})
    theirs = _version(registry, blob_store, b, "moss", vkw, **{"samples.png": grid})
    job, _ = registry.create_job(b, "moss", {}, 10)
    registry.update_job(job.id, checkpoint_sha256=mine.sha256, checkpoint_step=5)  # a checkpoint ref too

    assert lifecycle.delete_adapter(registry, blob_store, a, "fungi") == []
    assert set(everything_in(blob_store)) == _names(blob_store, mine.sha256, theirs.sha256, grid)
    registry.update_job(job.id, checkpoint_sha256=None, checkpoint_step=None)
    assert registry.referenced_blobs() == {theirs.sha256, grid}
    lifecycle.delete_adapter(registry, blob_store, b, "moss")
    # mine.sha256 was left orphaned by the first delete (then still referenced): gc's job.
    assert set(everything_in(blob_store)) == _names(blob_store, mine.sha256)


def test_tenant_purge_leaves_nothing_of_the_tenant(
    registry: Registry, blob_store: BlobStore, vkw: Any
) -> None:
    acme = registry.create_tenant("acme")
    registry.create_api_key("acme")
    registry.create_api_key("acme")
    keep = registry.create_tenant("globex")
    their_key = registry.create_api_key("globex")
    shared = _put(blob_store, "shared grid")
    versions = [
        _version(registry, blob_store, acme.id, "fungi", vkw, **{"samples.png": shared}),
        _version(registry, blob_store, acme.id, "fungi", vkw, **{"loss.json": _put(blob_store, "loss")}),
        _version(registry, blob_store, acme.id, "moss", vkw),
    ]
    running, _ = registry.create_job(acme.id, "lichen", {"steps": 9}, 9)
    ckpt = _put(blob_store, "ckpt")
    registry.update_job(running.id, state="running", checkpoint_sha256=ckpt, checkpoint_step=3)
    registry.add_job_event(running.id, "checkpoint", {"step": 3})
    failed, _ = registry.create_job(acme.id, "lichen", {"steps": 8}, 8)
    registry.update_job(failed.id, checkpoint_sha256=_put(blob_store, "ckpt2"), checkpoint_step=4)
    registry.update_job(failed.id, state="failed", error_code="x", error_message="y")
    theirs = _version(registry, blob_store, keep.id, "fungi", vkw, **{"samples.png": shared})
    their_job, _ = registry.create_job(keep.id, "fungi", {}, 5)

    lifecycle.purge_tenant(registry, blob_store, "acme")

    with pytest.raises(TenantNotFound):
        registry.get_tenant("acme")
    with registry._db.engine.connect() as conn:
        for table in ("api_keys", "adapters", "jobs"):
            n = conn.execute(text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t"), {"t": acme.id})
            assert n.scalar() == 0, table
        orphans = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM adapter_versions WHERE adapter_id NOT IN "
                "(SELECT id FROM adapters)) + (SELECT count(*) FROM job_events WHERE job_id NOT IN "
                "(SELECT id FROM jobs))"
            )
        ).scalar()
        assert orphans == 0
    # Only the other tenant's blobs are left, the shared grid among them.
    assert set(everything_in(blob_store)) == _names(blob_store, theirs.sha256, shared)
    assert not any(v.sha256 in str(everything_in(blob_store)) for v in versions)
    assert registry.tenant_for_key(their_key).name == "globex"
    assert registry.get_job(keep.id, their_job.id).state == "queued"
    with pytest.raises(TenantNotFound):
        lifecycle.purge_tenant(registry, blob_store, "acme")


def test_checkpoints_are_replaced_then_freed_when_the_job_ends(
    registry: Registry, blob_store: BlobStore
) -> None:
    t = registry.create_tenant("acme").id
    done, _ = registry.create_job(t, "fungi", {"n": 1}, 100)
    registry.update_job(done.id, state="running")
    first = lifecycle.replace_checkpoint(registry, blob_store, done.id, b"ckpt@50", 50, previous=None)
    second = lifecycle.replace_checkpoint(registry, blob_store, done.id, b"ckpt@100", 100, previous=first)
    assert everything_in(blob_store) == sorted(_names(blob_store, second))
    assert registry.get_job_unscoped(done.id).checkpoint_step == 100
    job = lifecycle.end_job(registry, blob_store, done.id, "succeeded", keep_checkpoint=False, step=100)
    assert job.state == "succeeded" and job.checkpoint_sha256 is None and job.finished_at is not None
    assert everything_in(blob_store) == []

    # A failed job keeps its last checkpoint (for the retention time; gc frees it later).
    failed, _ = registry.create_job(t, "fungi", {"n": 2}, 100)
    registry.update_job(failed.id, state="running")
    kept = lifecycle.replace_checkpoint(registry, blob_store, failed.id, b"ckpt@7", 7, previous=None)
    job = lifecycle.end_job(
        registry, blob_store, failed.id, "failed", keep_checkpoint=True, error_code="oom", error_message="m"
    )
    assert job.checkpoint_sha256 == kept and everything_in(blob_store) == sorted(_names(blob_store, kept))

    # Ending an already ended job changes nothing and frees nothing still referenced.
    lifecycle.end_job(registry, blob_store, failed.id, "cancelled", keep_checkpoint=False)
    assert registry.get_job_unscoped(failed.id).state == "failed"
    assert everything_in(blob_store) == sorted(_names(blob_store, kept))


def test_the_terminal_event_is_written_with_the_terminal_state(
    registry: Registry, blob_store: BlobStore
) -> None:
    # The job event stream ends at its first read of a terminal state, so that read
    # must already find the terminal event: both are one write.
    t = registry.create_tenant("acme").id
    job, _ = registry.create_job(t, "fungi", {"n": 1}, 10)
    registry.update_job(job.id, state="running")
    ended = lifecycle.end_job(
        registry,
        blob_store,
        job.id,
        "succeeded",
        keep_checkpoint=False,
        event={"adapter": "fungi", "version": 1},
    )
    assert ended.state == "succeeded"
    events = registry.job_events(job.id)
    assert [(e.kind, e.data) for e in events] == [("succeeded", {"adapter": "fungi", "version": 1})]
    # A job already ended is not changed, and gets no second terminal event.
    lifecycle.end_job(registry, blob_store, job.id, "failed", keep_checkpoint=False, event={"code": "x"})
    assert [e.kind for e in registry.job_events(job.id)] == ["succeeded"]


def test_ensure_stored_restores_a_blob_deleted_before_its_reference_committed(
    registry: Registry, blob_store: BlobStore, vkw: Any
) -> None:
    t = registry.create_tenant("acme").id
    data = b"adapter bytes"
    sha = blob_store.put_bytes(data)
    # A concurrent deleter saw no reference yet and removed the identical blob...
    assert registry.release_blobs([sha], blob_store.delete_many) == [sha]
    registry.add_version(t, "fungi", **vkw(sha256=sha))  # ...then the writer committed.
    assert lifecycle.ensure_stored(blob_store, {sha: data}) == [sha]
    assert blob_store.get_bytes(sha) == data
    assert lifecycle.ensure_stored(blob_store, {sha: data}) == []


def test_release_holds_writers_of_references_until_it_is_done(
    registry: Registry, blob_store: BlobStore, vkw: Any
) -> None:
    """The check-and-delete of release_blobs is atomic with respect to committing a reference."""
    t = registry.create_tenant("acme").id
    sha = blob_store.put_bytes(b"contended")
    entered, go = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_delete(shas: list[str]) -> None:
        entered.set()
        assert go.wait(30)
        blob_store.delete_many(shas)
        order.append("deleted")

    def writer() -> None:
        registry.add_version(t, "fungi", **vkw(sha256=sha))
        order.append("committed")

    deleter = threading.Thread(target=registry.release_blobs, args=([sha], slow_delete))
    committer = threading.Thread(target=writer)
    deleter.start()
    try:
        assert entered.wait(30)
        committer.start()
        committer.join(0.5)  # long enough to commit when nothing holds it back
        assert committer.is_alive(), "a reference was committed while a release held the lock"
    finally:
        go.set()
        deleter.join(30)
        if committer.ident is not None:
            committer.join(30)
    assert order == ["deleted", "committed"]
    # The writer's half of the protocol puts the blob back.
    assert lifecycle.ensure_stored(blob_store, {sha: b"contended"}) == [sha]


def test_a_store_error_after_the_commit_leaves_orphans_not_an_error(
    registry: Registry, blob_store: BlobStore, vkw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = registry.create_tenant("acme").id
    v = _version(registry, blob_store, t, "fungi", vkw)

    def down(shas: list[str]) -> None:
        from difffit.errors import BackendUnavailable

        raise BackendUnavailable("store down")

    monkeypatch.setattr(blob_store, "delete_many", down)
    assert lifecycle.delete_adapter(registry, blob_store, t, "fungi") == []
    with pytest.raises(AdapterNotFound):
        registry.get_adapter(t, "fungi")  # the delete itself happened
    monkeypatch.undo()
    assert blob_store.exists(v.sha256)  # an orphan, for difffit gc
