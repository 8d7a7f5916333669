"""Tenants and API keys (the part of the registry that authentication uses)."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from adapters_store.db import Database
from adapters_store.models import (
    Adapter,
    AdapterVersion,
    ApiKey,
    Dataset,
    Job,
    JobEventRow,
    Tenant,
    WebhookDelivery,
    utcnow,
)
from adapters_store.records import TenantRecord
from adapters_store.registry_blobs import version_blobs
from difffit.contract import NAME_PATTERN
from difffit.errors import Conflict, InvalidRequest, NotFound, TenantNotFound

NAME_RE = re.compile(NAME_PATTERN)
KEY_PREFIX = "dfs_"
DISPLAY_PREFIX_LEN = 8


def validate_name(name: str, what: str) -> str:
    """Return `name` if it is a valid tenant/adapter name, else InvalidRequest."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid {what} name {name!r}: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def hash_key(key: str) -> str:
    """The sha256 hex digest under which an API key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _tenant_record(row: Tenant) -> TenantRecord:
    return TenantRecord(id=row.id, name=row.name, created_at=row.created_at, disabled=row.disabled)


def _tenant_by_name(session: Session, name: str) -> Tenant:
    row = session.scalar(select(Tenant).where(Tenant.name == name))
    if row is None:
        raise TenantNotFound(f"tenant {name!r} not found")
    return row


class TenantOps:
    """Registry methods for tenants and their API keys."""

    _db: Database

    def create_tenant(self, name: str) -> TenantRecord:
        """Create a tenant; Conflict if the name is taken, InvalidRequest if malformed."""
        validate_name(name, "tenant")

        def fn(s: Session) -> TenantRecord:
            if s.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
                raise Conflict(f"tenant {name!r} already exists")
            row = Tenant(name=name, created_at=utcnow(), disabled=False)
            s.add(row)
            s.flush()
            return _tenant_record(row)

        return self._db.write(fn)

    def get_tenant(self, name: str) -> TenantRecord:
        """The tenant called `name`; TenantNotFound otherwise."""
        return self._db.read(lambda s: _tenant_record(_tenant_by_name(s, name)))

    def set_tenant_disabled(self, name: str, disabled: bool) -> TenantRecord:
        """Disable (or re-enable) a tenant: its keys stop authenticating."""

        def fn(s: Session) -> TenantRecord:
            row = _tenant_by_name(s, name)
            row.disabled = disabled
            s.flush()
            return _tenant_record(row)

        return self._db.write(fn)

    def purge_tenant(self, name: str) -> list[str]:
        """Delete a tenant with its keys, adapters, versions, jobs, job events, uploaded
        data sets and webhook deliveries.

        Returns the sha256s those rows referenced, for the caller to free
        (`adapters_store.lifecycle.purge_tenant`). Rows are deleted
        explicitly, children first, rather than left to ON DELETE CASCADE, so
        the purge does not depend on SQLite's foreign-key pragma. TenantNotFound
        for an unknown name.
        """

        def fn(s: Session) -> list[str]:
            tenant = _tenant_by_name(s, name)
            adapter_ids = select(Adapter.id).where(Adapter.tenant_id == tenant.id)
            job_ids = select(Job.id).where(Job.tenant_id == tenant.id)
            shas: dict[str, None] = {}
            for row in s.scalars(select(AdapterVersion).where(AdapterVersion.adapter_id.in_(adapter_ids))):
                shas.update(dict.fromkeys(version_blobs(row)))
            checkpoints = select(Job.checkpoint_sha256).where(
                Job.tenant_id == tenant.id, Job.checkpoint_sha256.is_not(None)
            )
            shas.update(dict.fromkeys(s.scalars(checkpoints)))
            shas.update(
                dict.fromkeys(s.scalars(select(Dataset.sha256).where(Dataset.tenant_id == tenant.id)))
            )
            previews = select(JobEventRow.data).where(
                JobEventRow.job_id.in_(job_ids), JobEventRow.kind == "preview"
            )
            shas.update(
                dict.fromkeys(
                    str(d["sha256"]) for d in s.scalars(previews) if isinstance(d, dict) and d.get("sha256")
                )
            )
            s.execute(delete(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant.id))
            s.execute(delete(Dataset).where(Dataset.tenant_id == tenant.id))
            s.execute(delete(JobEventRow).where(JobEventRow.job_id.in_(job_ids)))
            s.execute(delete(Job).where(Job.tenant_id == tenant.id))
            s.execute(delete(AdapterVersion).where(AdapterVersion.adapter_id.in_(adapter_ids)))
            s.execute(delete(Adapter).where(Adapter.tenant_id == tenant.id))
            s.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant.id))
            s.execute(delete(Tenant).where(Tenant.id == tenant.id))
            return list(shas)

        return self._db.write(fn)

    def create_api_key(self, tenant_name: str) -> str:
        """Create a key for the tenant and return its plaintext, the only time it exists.

        Only the sha256 and the first few characters (for display) are stored.
        """
        key = KEY_PREFIX + secrets.token_urlsafe(32)

        def fn(s: Session) -> str:
            tenant = _tenant_by_name(s, tenant_name)
            s.add(
                ApiKey(
                    tenant_id=tenant.id,
                    key_hash=hash_key(key),
                    prefix=key[:DISPLAY_PREFIX_LEN],
                    created_at=utcnow(),
                )
            )
            return key

        return self._db.write(fn)

    def tenant_for_key(self, key: str) -> TenantRecord | None:
        """The tenant a key belongs to; None if unknown, revoked or the tenant is disabled."""
        if not key:
            return None
        digest = hash_key(key)

        def fn(s: Session) -> TenantRecord | None:
            row = s.scalar(
                select(Tenant)
                .join(ApiKey, ApiKey.tenant_id == Tenant.id)
                .where(
                    ApiKey.key_hash == digest,
                    ApiKey.revoked_at.is_(None),
                    Tenant.disabled.is_(False),
                )
            )
            return None if row is None else _tenant_record(row)

        return self._db.read(fn)

    def revoke_key(self, key_or_prefix: str) -> None:
        """Revoke a key given in full or by its display prefix.

        Revoking an already revoked key is a no-op. A prefix that matches
        several live keys is refused (Conflict) rather than revoking them all.
        Raises NotFound when nothing matches.
        """
        if not key_or_prefix:
            raise InvalidRequest("revoke_key needs a key or a key prefix")

        def fn(s: Session) -> None:
            rows = list(s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_prefix))))
            if not rows and len(key_or_prefix) == DISPLAY_PREFIX_LEN:
                rows = list(s.scalars(select(ApiKey).where(ApiKey.prefix == key_or_prefix)))
            if not rows:
                raise NotFound(f"no API key matches {key_or_prefix[:DISPLAY_PREFIX_LEN]!r}")
            live = [r for r in rows if r.revoked_at is None]
            if len(live) > 1:
                raise Conflict(
                    f"prefix {key_or_prefix!r} matches {len(live)} live API keys; "
                    "pass the full key to revoke one"
                )
            for row in live:
                row.revoked_at = utcnow()

        self._db.write(fn)
