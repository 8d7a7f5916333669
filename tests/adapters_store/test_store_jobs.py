"""Registry: jobs, idempotency keys, state guard, cancel and events."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from adapters_store import JobEvent, JobRecord, Registry
from difffit.errors import Conflict, InvalidRequest, JobNotFound, TenantNotFound

REQUEST: dict[str, Any] = {"dataset_url": "file:///d.zip", "adapter": "fungi", "steps": 20}


@pytest.fixture
def tenant_id(registry: Registry) -> int:
    return registry.create_tenant("acme").id


def test_create_and_get_job(registry: Registry, tenant_id: int) -> None:
    job, created = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    assert created and isinstance(job, JobRecord)
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert (job.state, job.step, job.total_steps, job.attempts) == ("queued", 0, 20, 0)
    assert job.request == REQUEST and job.idempotency_key is None
    assert not job.cancel_requested and job.started_at is None and job.finished_at is None
    assert registry.get_job(tenant_id, job.id) == job
    assert registry.get_job_unscoped(job.id) == job
    with pytest.raises(JobNotFound, match="nope"):
        registry.get_job(tenant_id, "nope")
    with pytest.raises(JobNotFound):
        registry.get_job_unscoped("nope")


def test_job_validation(registry: Registry, tenant_id: int) -> None:
    with pytest.raises(InvalidRequest):
        registry.create_job(tenant_id, "Bad Name", REQUEST, 10)
    with pytest.raises(InvalidRequest):
        registry.create_job(tenant_id, "fungi", REQUEST, 0)
    with pytest.raises(InvalidRequest):
        registry.create_job(tenant_id, "fungi", {"x": object()}, 10)
    with pytest.raises(TenantNotFound):
        registry.create_job(99999, "fungi", REQUEST, 10)


def test_idempotency_key(registry: Registry, tenant_id: int) -> None:
    first, created = registry.create_job(tenant_id, "fungi", REQUEST, 20, idempotency_key="k1")
    again, created_again = registry.create_job(tenant_id, "fungi", dict(REQUEST), 20, idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict, match="k1"):
        registry.create_job(tenant_id, "fungi", {**REQUEST, "steps": 21}, 21, idempotency_key="k1")
    other, created_other = registry.create_job(tenant_id, "fungi", REQUEST, 20, "k2")
    assert created_other and other.id != first.id
    # The same key in another tenant's namespace is a different job.
    b = registry.create_tenant("b").id
    theirs, created_theirs = registry.create_job(b, "fungi", REQUEST, 20, "k1")
    assert created_theirs and theirs.id != first.id


def test_concurrent_idempotent_creates_make_one_job(registry: Registry, tenant_id: int) -> None:
    n = 5
    ids: list[str] = []
    created_flags: list[bool] = []
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def work() -> None:
        try:
            start.wait()
            job, created = registry.create_job(tenant_id, "fungi", REQUEST, 20, "same-key")
            ids.append(job.id)
            created_flags.append(created)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert len(set(ids)) == 1 and sorted(created_flags) == [False] * (n - 1) + [True]
    assert len(registry.list_jobs(tenant_id)) == 1


def test_tenant_isolation(registry: Registry, tenant_id: int) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    b = registry.create_tenant("b").id
    with pytest.raises(JobNotFound):
        registry.get_job(b, job.id)
    with pytest.raises(JobNotFound):
        registry.request_cancel(b, job.id)
    assert registry.list_jobs(b) == []
    assert not registry.get_job(tenant_id, job.id).cancel_requested


def test_list_jobs_newest_first_with_filter(registry: Registry, tenant_id: int) -> None:
    jobs = [registry.create_job(tenant_id, "fungi", REQUEST, 20)[0] for _ in range(4)]
    registry.update_job(jobs[1].id, state="running")
    listed = registry.list_jobs(tenant_id)
    assert [j.id for j in listed] == [j.id for j in reversed(jobs)]
    assert [j.id for j in registry.list_jobs(tenant_id, limit=2)] == [jobs[3].id, jobs[2].id]
    assert [j.id for j in registry.list_jobs(tenant_id, state="running")] == [jobs[1].id]
    with pytest.raises(InvalidRequest):
        registry.list_jobs(tenant_id, state="exploded")
    with pytest.raises(InvalidRequest):
        registry.list_jobs(tenant_id, limit=0)


def test_update_job_progress_and_stamps(registry: Registry, tenant_id: int) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    running = registry.update_job(job.id, state="running", attempts=1)
    assert running.state == "running" and running.started_at is not None
    assert running.updated_at >= job.updated_at
    progressed = registry.update_job(job.id, step=5, loss=0.25, eta_s=3.5, checkpoint_step=5)
    assert (progressed.step, progressed.loss, progressed.eta_s) == (5, 0.25, 3.5)
    assert progressed.started_at == running.started_at
    done = registry.update_job(job.id, state="succeeded", step=20, adapter_version=1)
    assert done.finished_at is not None and done.adapter_version == 1
    assert done.finished_at.tzinfo is not None


def test_update_job_rejects_unknown_fields_and_bad_values(registry: Registry, tenant_id: int) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    for bad in ({"tenant_id": 2}, {"id": "x"}, {"request": {}}, {"colour": "red"}):
        with pytest.raises(InvalidRequest):
            registry.update_job(job.id, **bad)
    for bad in ({"state": "exploded"}, {"step": "five"}, {"step": None}, {"attempts": True}):
        with pytest.raises(InvalidRequest):
            registry.update_job(job.id, **bad)
    with pytest.raises(JobNotFound):
        registry.update_job("missing", step=1)
    assert registry.get_job(tenant_id, job.id) == job


@pytest.mark.parametrize("terminal", ["succeeded", "failed", "cancelled"])
def test_terminal_state_is_final(registry: Registry, tenant_id: int, terminal: str) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    registry.update_job(job.id, state="running")
    final = registry.update_job(job.id, state=terminal, error_code="x" if terminal == "failed" else None)
    after = registry.update_job(job.id, state="running", step=7, loss=1.0)
    assert after == final and after.state == terminal
    assert registry.request_cancel(tenant_id, job.id) == final


def test_cancel_queued_job_is_immediate(registry: Registry, tenant_id: int) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    cancelled = registry.request_cancel(tenant_id, job.id)
    assert cancelled.state == "cancelled" and cancelled.cancel_requested
    assert cancelled.finished_at is not None
    # A worker picking it up late cannot revive it.
    assert registry.update_job(job.id, state="running").state == "cancelled"


def test_cancel_running_job_sets_flag(registry: Registry, tenant_id: int) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    registry.update_job(job.id, state="running")
    flagged = registry.request_cancel(tenant_id, job.id)
    assert flagged.state == "running" and flagged.cancel_requested
    assert flagged.finished_at is None
    done = registry.update_job(job.id, state="cancelled")
    assert done.state == "cancelled" and done.finished_at is not None


def test_job_events(registry: Registry, tenant_id: int) -> None:
    job, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    other, _ = registry.create_job(tenant_id, "fungi", REQUEST, 20)
    e1 = registry.add_job_event(job.id, "progress", {"step": 1, "loss": 0.5})
    registry.add_job_event(other.id, "progress", {"step": 1})
    e2 = registry.add_job_event(job.id, "state", {"state": "running"})
    assert isinstance(e1, JobEvent) and e1.data == {"step": 1, "loss": 0.5}
    assert e2.id > e1.id and e1.created_at <= datetime.now(UTC)
    assert registry.job_events(job.id) == [e1, e2]
    assert registry.job_events(job.id, after_id=e1.id) == [e2]
    assert registry.job_events(job.id, after_id=e2.id) == []
    assert registry.job_events("unknown") == []
    with pytest.raises(JobNotFound):
        registry.add_job_event("unknown", "progress", {})
    with pytest.raises(InvalidRequest):
        registry.add_job_event(job.id, "progress", {"bad": object()})


def test_count_jobs_by_state(registry: Registry, tenant_id: int) -> None:
    assert registry.count_jobs_by_state() == {
        "queued": 0,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    jobs = [registry.create_job(tenant_id, "fungi", REQUEST, 20)[0] for _ in range(3)]
    registry.update_job(jobs[0].id, state="running")
    registry.request_cancel(tenant_id, jobs[1].id)
    b = registry.create_tenant("b").id
    registry.create_job(b, "fungi", REQUEST, 20)
    counts = registry.count_jobs_by_state()
    assert counts["queued"] == 2 and counts["running"] == 1 and counts["cancelled"] == 1
    assert sum(counts.values()) == 4
