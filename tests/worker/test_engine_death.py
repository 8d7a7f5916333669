"""A worker whose engine dies: jobs are handed back, not failed; the worker reports down and stops."""

from __future__ import annotations

import threading
import time

import pytest
from celery.exceptions import Reject
from celery.worker import state

from difffit.errors import EngineDead
from tests.e2e.conftest import class_folder_zip
from worker import supervision


def _job(rt, tmp_path, steps: int):
    tenant = rt.registry.create_tenant("acme")
    url = class_folder_zip(tmp_path / "ds.zip", ["dark", "light"], per_class=6).as_uri()
    body = {"dataset_url": url, "adapter": "shades", "steps": steps, "batch_size": 8, "checkpoint_every": 2}
    job, _ = rt.registry.create_job(tenant.id, "shades", body, total_steps=steps)
    return job


def test_a_job_whose_engine_dies_stays_running_for_redelivery(runtime, tmp_path, monkeypatch):
    job = _job(runtime, tmp_path, steps=100_000)
    outcome: list[BaseException] = []

    def task_body():
        try:
            runtime.finetune(job.id)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    worker = threading.Thread(target=task_body)
    worker.start()
    deadline = time.monotonic() + 60
    while runtime.registry.get_job_unscoped(job.id).checkpoint_sha256 is None:
        assert time.monotonic() < deadline and worker.is_alive(), outcome
        time.sleep(0.05)
    runtime.engine.inject_fault("device lost")
    worker.join(30)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], EngineDead), outcome
    after = runtime.registry.get_job_unscoped(job.id)
    assert after.state == "running" and after.error_code is None
    assert after.checkpoint_sha256 is not None  # the next worker resumes from it
    assert "failed" not in [e.kind for e in runtime.registry.job_events(job.id)]

    # the Celery task hands the message back to the queue instead of acking it
    import worker.celery_app as celery_app
    from worker.tasks import finetune

    monkeypatch.setattr(celery_app, "get_runtime", lambda: runtime)
    monkeypatch.setattr("worker.tasks.time.sleep", lambda s: None)
    with pytest.raises(Reject) as rejected:
        finetune({"job_id": job.id})
    assert rejected.value.requeue is True


def test_engine_death_reports_down_and_starts_a_warm_shutdown_with_exit_code_70(monkeypatch):
    hard_exits: list[float] = []
    monkeypatch.setattr(supervision, "_exit_hard_later", hard_exits.append)
    monkeypatch.setattr(state, "should_stop", None)
    published: list[bool] = []
    supervision.handle_engine_death(EngineDead("boom"), lambda: published.append(True))
    assert state.should_stop == supervision.ENGINE_DEAD_EXIT_CODE == 70
    deadline = time.monotonic() + 10
    while not (hard_exits and published):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert hard_exits == [supervision.HARD_EXIT_AFTER_S] and published == [True]
