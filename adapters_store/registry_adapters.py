"""Adapters and their immutable versions, scoped by tenant."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session, selectinload

from adapters_store.db import Database
from adapters_store.models import Adapter, AdapterVersion, Dataset, Job, JobEventRow, Tenant, utcnow
from adapters_store.records import AdapterRecord, VersionRecord
from adapters_store.registry_tenants import validate_name
from difffit.errors import AdapterNotFound, InvalidRequest, TenantNotFound

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def _check_sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise InvalidRequest(f"{what} must be 64 lowercase hex characters, got {value!r}")
    return value


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} is not JSON-serialisable: {exc}") from exc


def version_record(name: str, row: AdapterVersion) -> VersionRecord:
    """Build the record of one version row (the adapter name lives on the parent)."""
    return VersionRecord(
        name=name,
        version=row.version,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        method=row.method,
        base_model_hash=row.base_model_hash,
        class_names=list(row.class_names),
        resolution=row.resolution,
        trainable_params=row.trainable_params,
        metadata=dict(row.metadata_),
        files=dict(row.files),
        job_id=row.job_id,
        created_at=row.created_at,
    )


def _adapter_record(row: Adapter) -> AdapterRecord:
    versions = [version_record(row.name, v) for v in sorted(row.versions, key=lambda v: v.version)]
    return AdapterRecord(
        name=row.name,
        created_at=row.created_at,
        latest_version=versions[-1].version if versions else 0,
        versions=versions,
    )


def _adapter_query(tenant_id: int, name: str) -> Any:
    return (
        select(Adapter)
        .where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        .options(selectinload(Adapter.versions))
    )


def _get_adapter_row(s: Session, tenant_id: int, name: str) -> Adapter:
    row = s.scalar(_adapter_query(tenant_id, name))
    # Another tenant's adapter gets the same answer as a missing one, so
    # names in other namespaces cannot be probed.
    if row is None:
        raise AdapterNotFound(f"adapter {name!r} not found")
    return row


class AdapterOps:
    """Registry methods for adapters and versions."""

    _db: Database

    def list_adapters(self, tenant_id: int) -> list[AdapterRecord]:
        """All adapters of a tenant, by name, each with its versions."""

        def fn(s: Session) -> list[AdapterRecord]:
            rows = s.scalars(
                select(Adapter)
                .where(Adapter.tenant_id == tenant_id)
                .options(selectinload(Adapter.versions))
                .order_by(Adapter.name)
            )
            return [_adapter_record(r) for r in rows]

        return self._db.read(fn)

    def get_adapter(self, tenant_id: int, name: str) -> AdapterRecord:
        """One adapter of the tenant; AdapterNotFound otherwise."""
        return self._db.read(lambda s: _adapter_record(_get_adapter_row(s, tenant_id, name)))

    def get_version(self, tenant_id: int, name: str, version: int | None = None) -> VersionRecord:
        """A version of an adapter, the latest when `version` is None."""

        def fn(s: Session) -> VersionRecord:
            adapter = _get_adapter_row(s, tenant_id, name)
            if not adapter.versions:
                raise AdapterNotFound(f"adapter {name!r} has no versions")
            if version is None:
                return version_record(name, max(adapter.versions, key=lambda v: v.version))
            for v in adapter.versions:
                if v.version == version:
                    return version_record(name, v)
            latest = max(v.version for v in adapter.versions)
            raise AdapterNotFound(f"adapter {name!r} has no version {version} (latest is {latest})")

        return self._db.read(fn)

    def add_version(
        self,
        tenant_id: int,
        name: str,
        *,
        sha256: str,
        size_bytes: int,
        method: str,
        base_model_hash: str,
        class_names: list[str],
        resolution: int,
        trainable_params: int,
        metadata: dict[str, Any],
        files: dict[str, str] | None = None,
        job_id: str | None = None,
    ) -> VersionRecord:
        """Register a new immutable version, creating the adapter if needed.

        The version is the previous highest plus one. Concurrent callers get
        distinct consecutive numbers: the adapter row is locked where the
        backend can (PostgreSQL), and a lost race on the unique
        (adapter, version) pair is retried by `Database.write`.
        """
        validate_name(name, "adapter")
        _check_sha(sha256, "sha256")
        files = dict(files or {})
        for fname, fsha in files.items():
            if not isinstance(fname, str) or not fname:
                raise InvalidRequest(f"file names must be non-empty strings, got {fname!r}")
            _check_sha(fsha, f"sha256 of file {fname!r}")
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise InvalidRequest(f"size_bytes must be a non-negative integer, got {size_bytes!r}")
        if not isinstance(resolution, int) or resolution <= 0:
            raise InvalidRequest(f"resolution must be a positive integer, got {resolution!r}")
        if not isinstance(trainable_params, int) or trainable_params < 0:
            raise InvalidRequest(f"trainable_params must be a non-negative integer, got {trainable_params!r}")
        if not class_names or not all(isinstance(c, str) for c in class_names):
            raise InvalidRequest("class_names must be a non-empty list of strings")
        if not method:
            raise InvalidRequest("method must be a non-empty string")
        _check_json(metadata, "metadata")
        class_names = list(class_names)
        metadata = dict(metadata)

        def fn(s: Session) -> VersionRecord:
            if s.get(Tenant, tenant_id) is None:
                raise TenantNotFound(f"tenant id {tenant_id} not found")
            adapter = s.scalar(
                select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name).with_for_update()
            )
            if adapter is None:
                adapter = Adapter(tenant_id=tenant_id, name=name, created_at=utcnow())
                s.add(adapter)
                s.flush()
            current = s.scalar(
                select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)
            )
            row = AdapterVersion(
                adapter_id=adapter.id,
                version=(current or 0) + 1,
                sha256=sha256,
                size_bytes=size_bytes,
                method=method,
                base_model_hash=base_model_hash,
                class_names=class_names,
                resolution=resolution,
                trainable_params=trainable_params,
                metadata_=metadata,
                files=files,
                job_id=job_id,
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return version_record(name, row)

        return self._db.write(fn)

    def delete_adapter(self, tenant_id: int, name: str) -> list[str]:
        """Delete an adapter and all its versions; return the sha256s they referenced.

        Blobs are content-addressed and may be shared with other versions or
        tenants, so they are left alone: use `blob_in_use` before deleting one.
        A later `add_version` with the same name starts again at version 1.
        """

        def fn(s: Session) -> list[str]:
            adapter = _get_adapter_row(s, tenant_id, name)
            shas: dict[str, None] = {}
            for v in sorted(adapter.versions, key=lambda v: v.version):
                shas[v.sha256] = None
                for fsha in v.files.values():
                    shas[fsha] = None
            s.delete(adapter)
            s.flush()
            return list(shas)

        return self._db.write(fn)

    def blob_in_use(self, sha256: str) -> bool:
        """Whether any version (blob or attached file), job checkpoint, uploaded data set or
        job preview grid references `sha256`."""
        _check_sha(sha256, "sha256")

        def fn(s: Session) -> bool:
            as_blob = select(AdapterVersion.id).where(AdapterVersion.sha256 == sha256)
            if s.scalar(as_blob.limit(1)) is not None:
                return True
            # A substring test on the JSON text is portable across backends and
            # exact enough: a 64-hex digest cannot occur by accident.
            in_files = select(AdapterVersion.id).where(cast(AdapterVersion.files, String).contains(sha256))
            if s.scalar(in_files.limit(1)) is not None:
                return True
            in_jobs = select(Job.id).where(Job.checkpoint_sha256 == sha256).limit(1)
            if s.scalar(in_jobs) is not None:
                return True
            in_datasets = select(Dataset.id).where(Dataset.sha256 == sha256).limit(1)
            if s.scalar(in_datasets) is not None:
                return True
            in_previews = select(JobEventRow.id).where(
                JobEventRow.kind == "preview", cast(JobEventRow.data, String).contains(sha256)
            )
            return s.scalar(in_previews.limit(1)) is not None

        return self._db.read(fn)
