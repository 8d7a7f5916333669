"""`difffit gc`: remove blobs nothing references, once they are older than a grace period.

Orphans come from crashes between an upload and the registry commit that
references it, from deletes whose store call failed, and from registries
older than the blob lifecycle. An upload in flight is an orphan too until
its writer commits, which is why only blobs older than DIFFFIT_GC_GRACE_S
go: keep the grace period above the longest gap between a writer's first
upload and its commit (a fine-tune's end writes the adapter, samples the
grid, then registers; minutes at most).

Steps: (1) ended jobs past their checkpoint retention lose their checkpoint
references and those blobs are freed; (2) the store is listed and every
unreferenced blob older than the cutoff is deleted, in batches, each batch
re-checked under the blob-reference lock (`Registry.release_blobs`);
(3) upload debris (temp files, multipart uploads) older than the cutoff is
removed. Timestamps are the store's own (file mtime, S3 LastModified).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from adapters_store.blobstore import BlobStore
from adapters_store.lifecycle import release
from adapters_store.registry import Registry

BATCH = 1000


@dataclass(frozen=True)
class GcReport:
    """What one gc pass saw and did (``difffit gc`` prints it as JSON)."""

    store: str
    dry_run: bool
    cutoff: str  # ISO time: unreferenced blobs modified before it were (or would be) deleted
    blobs: int  # blobs listed
    bytes: int
    referenced: int
    young: int  # unreferenced but inside the grace period: spared
    deleted: int  # unreferenced blobs swept
    deleted_bytes: int
    checkpoints_expired: int  # checkpoints of ended jobs freed (not counted in `deleted`)
    stale_uploads: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def collect_garbage(
    registry: Registry,
    store: BlobStore,
    *,
    grace_s: float,
    checkpoint_retention_s: float,
    now: datetime | None = None,
    dry_run: bool = False,
) -> GcReport:
    """One gc pass (see the module docstring). `now` defaults to the current UTC time."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=grace_s)
    expired: list[str] = []
    if not dry_run:
        dropped = registry.expire_checkpoints(failed_before=now - timedelta(seconds=checkpoint_retention_s))
        # Known checkpoints, not uploads in flight: no grace period needed.
        expired = release(registry, store, dropped, strict=True)

    # The references are read before the listing: a blob committed after this
    # read is young in the listing, and release_blobs re-checks under the lock.
    referenced = registry.referenced_blobs()
    listing = list(store.iter_blobs())
    unreferenced = [b for b in listing if b.sha256 not in referenced]
    old = [b for b in unreferenced if b.modified < cutoff]
    sizes = {b.sha256: b.size for b in old}

    deleted: list[str] = []
    stale = 0
    if dry_run:
        deleted = [b.sha256 for b in old]
    else:
        for start in range(0, len(old), BATCH):
            batch = [b.sha256 for b in old[start : start + BATCH]]
            deleted += release(registry, store, batch, strict=True)
        stale = store.remove_stale_uploads(cutoff)
    return GcReport(
        store=store.url,
        dry_run=dry_run,
        cutoff=cutoff.isoformat(),
        blobs=len(listing),
        bytes=sum(b.size for b in listing),
        referenced=len(listing) - len(unreferenced),
        young=len(unreferenced) - len(old),
        deleted=len(deleted),
        deleted_bytes=sum(sizes.get(sha, 0) for sha in deleted),
        checkpoints_expired=len(expired),
        stale_uploads=stale,
    )
