"""Uploaded data sets, scoped by tenant.

A data set row points at its archive blob by sha256. Blobs are
content-addressed and shared: two tenants uploading the same zip share one
blob, so a blob may only be removed when no row (data set, adapter version
or checkpoint) names it any more. ``adapters_store.registry_blobs._referenced``
counts data sets among the references, so deletes, purges and ``difffit gc``
keep an uploaded archive while a row names it.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_store.db import Database
from adapters_store.models import Dataset, Job, Tenant, utcnow
from adapters_store.records import DatasetRecord
from adapters_store.registry_adapters import _check_sha
from adapters_store.registry_blobs import lock_blob_refs
from difffit.errors import Conflict, DatasetNotFound, InvalidRequest, TenantNotFound

MAX_LIST_LIMIT = 1000


def dataset_record(row: Dataset) -> DatasetRecord:
    """Build the record of a data set row."""
    return DatasetRecord.model_validate(row)


def _dataset_row(s: Session, tenant_id: int, dataset_id: str) -> Dataset:
    row = s.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
    # Another tenant's data set reads as missing: existence is never revealed.
    if row is None:
        raise DatasetNotFound(f"dataset {dataset_id[:64]!r} not found")
    return row


class DatasetOps:
    """Registry methods for uploaded data sets."""

    _db: Database

    def add_dataset(
        self,
        tenant_id: int,
        *,
        sha256: str,
        size_bytes: int,
        class_names: list[str],
        class_counts: list[int],
        filename: str | None = None,
    ) -> DatasetRecord:
        """Record a validated upload whose blob is already stored; returns it with its new id."""
        _check_sha(sha256, "sha256")
        if not class_names or len(class_names) != len(class_counts):
            raise InvalidRequest("class_names and class_counts must be non-empty and of equal length")
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise InvalidRequest(f"size_bytes must be a non-negative integer, got {size_bytes!r}")
        names, counts = [str(c) for c in class_names], [int(n) for n in class_counts]
        dataset_id = "ds_" + uuid.uuid4().hex

        def fn(s: Session) -> DatasetRecord:
            lock_blob_refs(s, exclusive=False)  # this commits a reference to a blob
            if s.get(Tenant, tenant_id) is None:
                raise TenantNotFound(f"tenant id {tenant_id} not found")
            row = Dataset(
                id=dataset_id,
                tenant_id=tenant_id,
                filename=(filename or None) and filename[:255],
                sha256=sha256,
                size_bytes=size_bytes,
                class_names=names,
                class_counts=counts,
                images=sum(counts),
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return dataset_record(row)

        return self._db.write(fn)

    def get_dataset(self, tenant_id: int, dataset_id: str) -> DatasetRecord:
        """A data set of the tenant; DatasetNotFound otherwise (also for other tenants')."""
        return self._db.read(lambda s: dataset_record(_dataset_row(s, tenant_id, dataset_id)))

    def list_datasets(self, tenant_id: int, limit: int = 100) -> list[DatasetRecord]:
        """The tenant's data sets, newest first."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit!r}")

        def fn(s: Session) -> list[DatasetRecord]:
            query = (
                select(Dataset)
                .where(Dataset.tenant_id == tenant_id)
                .order_by(Dataset.created_at.desc(), Dataset.id.desc())
                .limit(limit)
            )
            return [dataset_record(r) for r in s.scalars(query)]

        return self._db.read(fn)

    def delete_dataset(self, tenant_id: int, dataset_id: str) -> tuple[DatasetRecord, bool]:
        """Delete a data set row; return it and whether its blob is now unreferenced.

        Refused (Conflict) while a queued or running job of the tenant trains
        on it: the job reads the blob when it starts.
        """

        def fn(s: Session) -> tuple[DatasetRecord, bool]:
            row = _dataset_row(s, tenant_id, dataset_id)
            active = s.scalars(
                select(Job).where(Job.tenant_id == tenant_id, Job.state.in_(("queued", "running")))
            )
            users = [j.id for j in active if (j.request or {}).get("dataset_id") == dataset_id]
            if users:
                raise Conflict(
                    f"dataset {dataset_id!r} is used by job {users[0]} ({len(users)} active); "
                    "cancel it or wait for it to end"
                )
            record = dataset_record(row)
            s.delete(row)
            s.flush()
            others = s.scalar(select(Dataset.id).where(Dataset.sha256 == record.sha256).limit(1))
            return record, others is None

        return self._db.write(fn)

    def dataset_blob_shas(self) -> set[str]:
        """The sha256 of every uploaded data set's archive, all tenants: blobs a
        garbage collector must keep (with adapter versions' and checkpoints')."""
        return self._db.read(lambda s: set(s.scalars(select(Dataset.sha256).distinct())))
