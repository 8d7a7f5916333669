"""Uploaded data sets and the webhook outbox in the registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from difffit.errors import Conflict, DatasetNotFound

from .conftest import SHA_A, SHA_B


def _dataset(reg, tenant_id: int, sha: str = SHA_A):
    return reg.add_dataset(
        tenant_id, sha256=sha, size_bytes=10, class_names=["a", "b"], class_counts=[2, 3], filename="d.zip"
    )


def test_datasets_are_tenant_scoped_and_counted_as_referenced_blobs(registry):
    acme, other = registry.create_tenant("acme"), registry.create_tenant("other")
    ds = _dataset(registry, acme.id)
    assert ds.id.startswith("ds_") and ds.images == 5 and ds.class_names == ["a", "b"]
    assert registry.get_dataset(acme.id, ds.id) == ds
    assert registry.list_datasets(acme.id) == [ds]
    with pytest.raises(DatasetNotFound):
        registry.get_dataset(other.id, ds.id)
    assert registry.list_datasets(other.id) == []
    assert registry.dataset_blob_shas() == {SHA_A}
    assert registry.blob_in_use(SHA_A) and not registry.blob_in_use(SHA_B)

    same = _dataset(registry, other.id)  # same content, another tenant
    record, unreferenced = registry.delete_dataset(acme.id, ds.id)
    assert record == ds and not unreferenced and registry.blob_in_use(SHA_A)
    _, unreferenced = registry.delete_dataset(other.id, same.id)
    assert unreferenced and registry.dataset_blob_shas() == set()
    with pytest.raises(DatasetNotFound):
        registry.delete_dataset(other.id, same.id)


def test_a_dataset_an_active_job_trains_on_cannot_be_deleted(registry):
    acme = registry.create_tenant("acme")
    ds = _dataset(registry, acme.id)
    job, _ = registry.create_job(acme.id, "x", {"dataset_id": ds.id}, total_steps=1)
    with pytest.raises(Conflict, match=job.id):
        registry.delete_dataset(acme.id, ds.id)
    registry.update_job(job.id, state="failed")
    registry.delete_dataset(acme.id, ds.id)


def test_each_terminal_state_queues_one_webhook_delivery(registry):
    acme = registry.create_tenant("acme")
    url = "https://hooks.example/x"
    done, _ = registry.create_job(acme.id, "a", {"webhook_url": url}, total_steps=1)
    queued, _ = registry.create_job(acme.id, "a", {"webhook_url": url}, total_steps=1)
    silent, _ = registry.create_job(acme.id, "a", {}, total_steps=1)
    registry.update_job(done.id, state="running")
    assert registry.webhook_deliveries(done.id) == []
    registry.update_job(done.id, state="succeeded", adapter_version=1)
    registry.update_job(done.id, state="failed")  # terminal already: no change, no second call
    registry.request_cancel(acme.id, queued.id)
    registry.update_job(silent.id, state="failed")
    [d1] = registry.webhook_deliveries(done.id)
    [d2] = registry.webhook_deliveries(queued.id)
    assert (d1.event, d1.url, d1.state, d1.tenant_id) == ("job.succeeded", url, "pending", acme.id)
    assert d2.event == "job.cancelled"
    assert registry.webhook_deliveries(silent.id) == []


def test_claims_lease_due_deliveries_and_attempts_are_recorded(registry):
    acme = registry.create_tenant("acme")
    job, _ = registry.create_job(acme.id, "a", {"webhook_url": "https://h.example/"}, total_steps=1)
    registry.update_job(job.id, state="failed")
    [claimed] = registry.claim_webhook_deliveries(lease_s=60)
    assert registry.claim_webhook_deliveries(lease_s=60) == []  # leased
    later = datetime.now(UTC) + timedelta(seconds=0.3)
    d = registry.finish_webhook_attempt(
        claimed.id, delivered=False, status=500, error="HTTP 500", retry_at=later
    )
    assert (d.state, d.attempts, d.last_status) == ("pending", 1, 500)
    assert registry.claim_webhook_deliveries(lease_s=60) == []  # not due yet
    deadline = time.monotonic() + 10
    again = []
    while not again and time.monotonic() < deadline:
        time.sleep(0.1)
        again = registry.claim_webhook_deliveries(lease_s=60)
    assert [a.id for a in again] == [claimed.id]
    d = registry.finish_webhook_attempt(claimed.id, delivered=True, status=204, error=None, retry_at=None)
    assert (d.state, d.attempts) == ("delivered", 2) and d.delivered_at is not None
    assert registry.claim_webhook_deliveries(lease_s=60) == []


def test_webhook_secret_is_made_once_and_rotates(registry):
    acme = registry.create_tenant("acme")
    secret = registry.webhook_secret(acme.id)
    assert secret.startswith("whsec_") and len(secret) > 40
    assert registry.webhook_secret(acme.id) == secret
    rotated = registry.rotate_webhook_secret(acme.id)
    assert rotated != secret and registry.webhook_secret(acme.id) == rotated


def test_preview_grids_named_by_job_events_count_as_referenced(registry):
    acme = registry.create_tenant("acme")
    job, _ = registry.create_job(acme.id, "a", {}, total_steps=1)
    assert registry.preview_blob_shas() == set() and not registry.blob_in_use(SHA_B)
    registry.add_job_event(job.id, "preview", {"step": 1, "sha256": SHA_B, "url": "x"})
    registry.add_job_event(job.id, "checkpoint", {"step": 1, "sha256": SHA_A})  # not a preview
    assert registry.preview_blob_shas() == {SHA_B} and registry.blob_in_use(SHA_B)
