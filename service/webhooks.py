"""Webhook delivery: signed POSTs of a job when it ends, retried with backoff.

Where it runs, and why there: in the API process, as one daemon thread (the
dispatcher) started with the app. The calls to make live in the registry's
outbox (``webhook_deliveries``), written in the same transaction that makes a
job terminal, whoever does it (a worker, or the API cancelling a queued
job). So nothing is lost when any process restarts: a new dispatcher finds
the due rows; one that died mid-call leaves a lease that runs out, and the
call is made again (at least once: receivers dedupe on ``X-DiffFit-Delivery``).
Any number of API processes may dispatch: rows are leased, not shared. GPU
workers never make outbound calls to tenants' URLs.

Each POST carries the job's JSON (as ``GET /jobs/{id}`` shows it) and:

- ``X-DiffFit-Signature: sha256=<hex>``: HMAC-SHA256 of the raw body under
  the tenant's secret (``GET /webhooks/secret``);
- ``X-DiffFit-Event: job.succeeded`` (or ``job.failed``, ``job.cancelled``);
- ``X-DiffFit-Delivery: <id>``: the same on every retry of one delivery.

A 2xx answer delivers it. Anything else (an error status, a timeout, a
refused connection, a host that now resolves to a private address) is
retried after ``DIFFFIT_WEBHOOK_BACKOFF_S`` doubling per attempt (at most
1 h), up to ``DIFFFIT_WEBHOOK_MAX_ATTEMPTS`` calls; redirects are not
followed (a redirect could lead to an internal address).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from difffit.archives import check_public_host
from difffit.errors import DiffFitError, InvalidRequest
from difffit.settings import Settings

log = logging.getLogger("difffit.service.webhooks")

SIGNATURE_HEADER = "X-DiffFit-Signature"
EVENT_HEADER = "X-DiffFit-Event"
DELIVERY_HEADER = "X-DiffFit-Delivery"
MAX_BACKOFF_S = 3600.0
BATCH = 20


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of body under secret>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def backoff_s(settings: Settings, attempts: int) -> float:
    """Delay after the `attempts`-th failed call (1-based): base * 2^(attempts - 1), capped."""
    return min(settings.webhook_backoff_s * 2 ** max(0, attempts - 1), MAX_BACKOFF_S)


class WebhookDispatcher:
    """The thread that delivers due webhooks from the registry's outbox."""

    def __init__(self, registry: Any, settings: Settings):
        self.registry = registry
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="difffit-webhooks", daemon=True)
        self._http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)

    def start(self) -> WebhookDispatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._http.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - the database may be away; try again next tick
                log.warning("webhook dispatch failed; retrying", exc_info=True)
                busy = False
            if not busy:
                self._stop.wait(self.settings.webhook_poll_s)

    def run_once(self) -> bool:
        """Deliver what is due now; True when a full batch was claimed (more may wait)."""
        lease = 2 * self.settings.webhook_timeout_s + 30
        deliveries = self.registry.claim_webhook_deliveries(lease_s=lease, limit=BATCH)
        for delivery in deliveries:
            if self._stop.is_set():
                break  # the lease runs out and another dispatcher takes it
            self.deliver(delivery)
        return len(deliveries) == BATCH

    def deliver(self, delivery: Any) -> None:
        """One attempt: POST, then record delivered / retry at / failed."""
        from service.routes.jobs import job_out

        status: int | None = None
        error: str | None = None
        try:
            job = self.registry.get_job_unscoped(delivery.job_id)
            body = job_out(job).model_dump_json().encode("utf-8")
            secret = self.registry.webhook_secret(delivery.tenant_id)
            check_public_host(delivery.url, self.settings, what="webhook", error=InvalidRequest)
            resp = self._http.post(
                delivery.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "DiffFit-Serve-Webhooks/1",
                    SIGNATURE_HEADER: sign(secret, body),
                    EVENT_HEADER: delivery.event,
                    DELIVERY_HEADER: str(delivery.id),
                },
            )
            status = resp.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except DiffFitError as exc:
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        retry_at = None
        if error is not None and attempts < self.settings.webhook_max_attempts:
            retry_at = datetime.now(UTC) + timedelta(seconds=backoff_s(self.settings, attempts))
        self.registry.finish_webhook_attempt(
            delivery.id, delivered=error is None, status=status, error=error, retry_at=retry_at
        )
        if error is None:
            log.info("webhook %s for job %s delivered (%s)", delivery.event, delivery.job_id, status)
        else:
            log.warning(
                "webhook %s for job %s: attempt %d failed (%s)%s",
                delivery.event,
                delivery.job_id,
                attempts,
                error,
                "" if retry_at else "; giving up",
            )
