"""The life of a blob after it is written: what frees it, and when.

Rows go first, blobs after: each operation commits its registry change, then
frees the blobs the removed rows referenced that nothing else references
(`Registry.release_blobs`, under the blob-reference lock). A crash in
between, or a store that is down, leaves orphans and never a dangling
reference; `difffit gc` (`adapters_store.gc`) removes orphans later.

- `delete_adapter`, `delete_version`: an adapter's or a version's files;
- `purge_tenant`: everything of a tenant;
- `replace_checkpoint`, `end_job`: a job's checkpoints go as soon as a newer
  one is recorded and when the job ends (a failed job keeps its last one
  until DIFFFIT_CHECKPOINT_RETENTION_S, then gc drops it);
- `ensure_stored`: the writer's half of the protocol in
  `adapters_store.registry_blobs`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters_store.blobstore import BlobStore
from adapters_store.records import JobRecord
from adapters_store.registry import Registry
from difffit.errors import DiffFitError

log = logging.getLogger(__name__)


def release(registry: Registry, store: BlobStore, shas: Iterable[str], *, strict: bool = False) -> list[str]:
    """Delete those of `shas` nothing references; return them.

    With strict=False (the default, for operations whose registry change is
    already committed), a store error is logged and the blobs are left to
    `difffit gc` instead of failing the caller.
    """
    shas = list(shas)
    if not shas:
        return []
    try:
        freed = registry.release_blobs(shas, store.delete_many)
    except DiffFitError as exc:
        if strict:
            raise
        log.warning("could not free %d blob(s) in %s (difffit gc will): %s", len(shas), store.url, exc)
        return []
    if freed:
        log.info("freed %d blob(s) in %s", len(freed), store.url)
    return freed


def ensure_stored(store: BlobStore, blobs: Mapping[str, bytes | Path]) -> list[str]:
    """After committing references to `blobs` (sha256 -> bytes or file), put back any that vanished.

    A deleter that checked references just before the commit may have removed
    an identical blob (content addressing shares them); this check after the
    commit closes that window. Returns the sha256s that had to be re-put.
    """
    restored = []
    for sha, content in blobs.items():
        if store.exists(sha):
            continue
        got = store.put_file(content) if isinstance(content, Path) else store.put_bytes(content)
        if got != sha:
            raise ValueError(f"ensure_stored: content for {sha} hashes to {got}")
        log.warning("blob %s vanished after it was registered (a concurrent delete); stored again", sha)
        restored.append(sha)
    return restored


def delete_adapter(registry: Registry, store: BlobStore, tenant_id: int, name: str) -> list[str]:
    """Delete an adapter with all its versions and free their blobs; return the freed sha256s."""
    return release(registry, store, registry.delete_adapter(tenant_id, name))


def delete_version(
    registry: Registry, store: BlobStore, tenant_id: int, name: str, version: int
) -> list[str]:
    """Delete one version (the adapter with its last one) and free its blobs; return the freed sha256s."""
    return release(registry, store, registry.delete_version(tenant_id, name, version))


def purge_tenant(registry: Registry, store: BlobStore, name: str) -> list[str]:
    """Delete a tenant's keys, adapters, jobs and events, then free its blobs; return the freed sha256s.

    A job of the tenant still running on a worker notices at its next
    progress write (its row is gone) and stops; a blob it writes after the
    purge is an orphan for `difffit gc`.
    """
    return release(registry, store, registry.purge_tenant(name))


def replace_checkpoint(
    registry: Registry, store: BlobStore, job_id: str, data: bytes, step: int, previous: str | None
) -> str:
    """Store a job's new checkpoint, record it, free the one it replaces; return its sha256."""
    sha = store.put_bytes(data)
    registry.update_job(job_id, checkpoint_sha256=sha, checkpoint_step=step)
    ensure_stored(store, {sha: data})
    if previous and previous != sha:
        release(registry, store, [previous])
    return sha


def end_job(
    registry: Registry,
    store: BlobStore,
    job_id: str,
    state: str,
    *,
    keep_checkpoint: bool,
    event: dict[str, Any] | None = None,
    **fields: Any,
) -> JobRecord:
    """Move a job to the terminal `state` and free its checkpoint unless `keep_checkpoint`.

    The reference is cleared in the same write that ends the job, so a
    finished job never points at a deleted blob; an `event` (its data; the
    kind is `state`) is recorded in that write too.
    """
    checkpoint = registry.get_job_unscoped(job_id).checkpoint_sha256
    if not keep_checkpoint:
        fields.update(checkpoint_sha256=None, checkpoint_step=None)
    fields.setdefault("finished_at", datetime.now(UTC))
    record = registry.update_job(
        job_id, state=state, event=None if event is None else (state, event), **fields
    )
    if checkpoint and not keep_checkpoint:
        # Still referenced (e.g. the job was already terminal)? Then release keeps it.
        release(registry, store, [checkpoint])
    return record
