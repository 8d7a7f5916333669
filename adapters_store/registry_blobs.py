"""Which blobs the registry references, and freeing the ones it no longer does.

`_referenced` is the ONE place that knows every kind of reference to a blob:

- an adapter version's adapter file (``adapter_versions.sha256``),
- the files attached to a version (``adapter_versions.files``: sample grid,
  loss curve, ...),
- a job's latest checkpoint (``jobs.checkpoint_sha256``),
- an uploaded data set's archive (``datasets.sha256``),
- a training preview grid named by a job's ``preview`` event.

A new kind of reference is added there, and its
writer follows the protocol below; gc, deletes and tenant purges then
respect it without further change.

Protocol between writers and deleters (so a blob is never deleted while a
reference to it is being committed):

1. a writer uploads the blob, then commits the reference in a write
   transaction that calls ``lock_blob_refs(session, exclusive=False)``, then
   checks the blob still exists and re-uploads it if not
   (`adapters_store.lifecycle.ensure_stored`);
2. a deleter (`BlobRefOps.release_blobs`) holds the exclusive lock while it
   checks references and deletes.

Either the deleter sees the committed reference, or the deletion finished
before the commit and the writer's check after it restores the blob. The
lock is a PostgreSQL advisory lock; on SQLite every write transaction
already holds the database's write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import String, cast, or_, select, text
from sqlalchemy.orm import Session

from adapters_store.blobstore.base import check_sha
from adapters_store.db import Database
from adapters_store.models import AdapterVersion, Dataset, Job, JobEventRow
from difffit.errors import InvalidRequest

# pg_advisory_xact_lock key of blob references (distinct from the migration lock).
BLOB_REFS_LOCK = 0x0B10B5
# Above this many candidates one scan of all attached files beats one LIKE per candidate.
_LIKE_LIMIT = 32


def lock_blob_refs(session: Session, *, exclusive: bool) -> None:
    """Take the blob-reference lock for the rest of `session`'s transaction (see the module docstring)."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: write transactions are serialised by BEGIN IMMEDIATE
    fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    session.execute(text(f"SELECT {fn}(:key)"), {"key": BLOB_REFS_LOCK})


def version_blobs(row: AdapterVersion) -> list[str]:
    """The blobs one version references: its adapter file, then its attached files."""
    return [row.sha256, *dict(row.files or {}).values()]


def _referenced(s: Session, among: list[str] | None) -> set[str]:
    """Every referenced blob, or those of `among` that are referenced."""
    refs: set[str] = set()
    adapters = select(AdapterVersion.sha256)
    files = select(AdapterVersion.files)
    checkpoints = select(Job.checkpoint_sha256).where(Job.checkpoint_sha256.is_not(None))
    datasets = select(Dataset.sha256)
    previews = select(JobEventRow.data).where(JobEventRow.kind == "preview")
    if among is not None:
        if not among:
            return refs
        adapters = adapters.where(AdapterVersion.sha256.in_(among))
        checkpoints = checkpoints.where(Job.checkpoint_sha256.in_(among))
        datasets = datasets.where(Dataset.sha256.in_(among))
        if len(among) <= _LIKE_LIMIT:
            # A substring test on the JSON text is portable across backends and
            # exact enough: a 64-hex digest cannot occur by accident.
            files = files.where(or_(*(cast(AdapterVersion.files, String).contains(sha) for sha in among)))
    refs.update(s.scalars(adapters))
    for attached in s.scalars(files):
        refs.update(dict(attached or {}).values())
    refs.update(s.scalars(checkpoints))
    refs.update(s.scalars(datasets))
    refs.update(str(d["sha256"]) for d in s.scalars(previews) if isinstance(d, dict) and d.get("sha256"))
    return refs if among is None else refs & set(among)


def _candidates(shas: Iterable[str]) -> list[str]:
    out: dict[str, None] = {}
    for sha in shas:
        out[check_sha(sha)] = None
    return list(out)


class BlobRefOps:
    """Registry methods over blob references."""

    _db: Database

    def referenced_blobs(self, among: Iterable[str] | None = None) -> set[str]:
        """The sha256s the registry references (all of them, or those of `among`)."""
        cands = None if among is None else _candidates(among)
        return self._db.read(lambda s: _referenced(s, cands))

    def blob_in_use(self, sha256: str) -> bool:
        """Whether a version (blob or attached file), checkpoint, data set or preview references `sha256`."""
        try:
            cands = _candidates([sha256])
        except InvalidRequest:
            raise InvalidRequest(f"sha256 must be 64 lowercase hex characters, got {sha256!r}") from None
        return bool(self.referenced_blobs(cands))

    def release_blobs(self, candidates: Iterable[str], delete: Callable[[list[str]], Any]) -> list[str]:
        """Delete, with `delete(shas)`, those `candidates` nothing references; return them.

        Runs under the exclusive blob-reference lock, so no reference to a
        candidate can be committed between the check and the deletion. If
        `delete` raises, the error propagates and nothing is reported freed.
        """
        cands = _candidates(candidates)
        if not cands:
            return []

        def fn(s: Session) -> list[str]:
            lock_blob_refs(s, exclusive=True)
            refs = _referenced(s, cands)
            free = [sha for sha in cands if sha not in refs]
            if free:
                delete(free)
            return free

        return self._db.write(fn)
