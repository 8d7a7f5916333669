"""Webhook secrets and the webhook outbox.

A job that asked for ``webhook_url`` gets one outbox row per terminal
state, inserted by :func:`enqueue_terminal_webhook` in the same transaction
that makes the job terminal (whoever does it: a worker finishing or failing
the job, the API cancelling a queued one). A dispatcher then claims due rows
with a lease, posts, and records the outcome; a process that dies mid-call
leaves a lease that expires, and another dispatcher retries. So a delivery
survives restarts of every process: it lives in the database, not in memory.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from adapters_store.db import Database
from adapters_store.models import Job, Tenant, WebhookDelivery, utcnow
from adapters_store.records import WebhookDeliveryRecord
from difffit.errors import TenantNotFound

SECRET_PREFIX = "whsec_"
DELIVERY_STATES = ("pending", "delivered", "failed")


def new_webhook_secret() -> str:
    """A fresh signing secret (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def enqueue_terminal_webhook(s: Session, job: Job) -> None:
    """Add the outbox row of a job that has just turned terminal (no-op without a URL)."""
    url = (job.request or {}).get("webhook_url")
    if not url:
        return
    now = utcnow()
    s.add(
        WebhookDelivery(
            job_id=job.id,
            tenant_id=job.tenant_id,
            url=str(url),
            event=f"job.{job.state}",
            state="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def _record(row: WebhookDelivery) -> WebhookDeliveryRecord:
    return WebhookDeliveryRecord.model_validate(row)


class WebhookOps:
    """Registry methods for webhook secrets and deliveries."""

    _db: Database

    def webhook_secret(self, tenant_id: int) -> str:
        """The tenant's signing secret, made on first use."""

        def fn(s: Session) -> str:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise TenantNotFound(f"tenant id {tenant_id} not found")
            if not tenant.webhook_secret:
                tenant.webhook_secret = new_webhook_secret()
                s.flush()
            return tenant.webhook_secret

        current = self._db.read(lambda s: getattr(s.get(Tenant, tenant_id), "webhook_secret", None))
        return current or self._db.write(fn)

    def rotate_webhook_secret(self, tenant_id: int) -> str:
        """Replace the tenant's signing secret; deliveries from now on use the new one."""

        def fn(s: Session) -> str:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise TenantNotFound(f"tenant id {tenant_id} not found")
            tenant.webhook_secret = new_webhook_secret()
            s.flush()
            return tenant.webhook_secret

        return self._db.write(fn)

    def claim_webhook_deliveries(self, lease_s: float, limit: int = 20) -> list[WebhookDeliveryRecord]:
        """Lease up to `limit` due pending deliveries for `lease_s` seconds and return them.

        A leased row is skipped by other dispatchers until its lease runs out,
        so N API processes deliver each call once (at least once if one dies
        mid-call: receivers dedupe on the delivery id).
        """

        def due(now: datetime) -> Any:
            return select(WebhookDelivery).where(
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.leased_until.is_(None), WebhookDelivery.leased_until < now),
            )

        def fn(s: Session) -> list[WebhookDeliveryRecord]:
            now = utcnow()
            query = (
                due(now)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            rows = list(s.scalars(query))
            for row in rows:
                row.leased_until = now + timedelta(seconds=lease_s)
            s.flush()
            return [_record(r) for r in rows]

        # Polled every second or so: a read first, so an idle outbox takes no write lock.
        if (
            self._db.read(lambda s: s.scalar(due(utcnow()).with_only_columns(WebhookDelivery.id).limit(1)))
            is None
        ):
            return []
        return self._db.write(fn)

    def finish_webhook_attempt(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status: int | None,
        error: str | None,
        retry_at: datetime | None,
    ) -> WebhookDeliveryRecord:
        """Record one attempt: delivered, to be retried at `retry_at`, or (None) given up."""

        def fn(s: Session) -> WebhookDeliveryRecord:
            row = s.get(WebhookDelivery, delivery_id)
            assert row is not None, delivery_id
            now = utcnow()
            row.attempts += 1
            row.last_status = status
            row.last_error = None if error is None else error[:1000]
            row.leased_until = None
            if delivered:
                row.state, row.delivered_at = "delivered", now
            elif retry_at is None:
                row.state = "failed"
            else:
                row.next_attempt_at = retry_at
            s.flush()
            return _record(row)

        return self._db.write(fn)

    def webhook_deliveries(self, job_id: str) -> list[WebhookDeliveryRecord]:
        """The outbox rows of one job (not tenant-scoped: check access with `get_job`)."""

        def fn(s: Session) -> list[WebhookDeliveryRecord]:
            query = (
                select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
            )
            return [_record(r) for r in s.scalars(query)]

        return self._db.read(fn)
