"""A worker at its fine-tune cap still runs generates; a caller that goes away stops its sampling."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery.exceptions import Retry

import worker.celery_app as celery_app
from difffit.contract import GenerateTask
from difffit.errors import GenerationCancelled
from worker import tasks
from worker.cancellation import CancelWatcher
from worker.finetune_slots import FinetuneSlots, effective_cap

DEADLINE_S = 60.0


def test_effective_cap_leaves_a_thread_for_generates():
    assert effective_cap(2, 8) == 2
    assert effective_cap(8, 8) == 7
    assert effective_cap(4, 1) == 1


def test_a_worker_at_its_fine_tune_cap_still_runs_a_generate(runtime, monkeypatch):
    # The Celery thread pool modelled by a 2-thread executor: without the cap two
    # fine-tunes would hold both threads and the generate would wait for them.
    release = threading.Event()
    started: list[str] = []

    def long_finetune(job_id: str) -> None:
        started.append(job_id)
        release.wait(DEADLINE_S)

    monkeypatch.setattr(runtime, "finetune", long_finetune)
    monkeypatch.setattr(celery_app, "_runtime", runtime)
    monkeypatch.setattr(celery_app, "_finetune_slots", FinetuneSlots(1))
    task = GenerateTask(request_id="g", tenant="1", class_labels=[1], seed=3, steps=3)
    with ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(tasks.finetune, {"job_id": "job-1"})
            deadline = time.monotonic() + DEADLINE_S
            while not started:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = pool.submit(tasks.finetune, {"job_id": "job-2"})
            # Given back at once (Celery requeues a copy after a countdown), its thread freed.
            with pytest.raises(Retry):
                second.result(timeout=DEADLINE_S)
            result = pool.submit(tasks.generate, task.model_dump(mode="json")).result(timeout=DEADLINE_S)
            assert result["ok"] and len(result["result"]["images_png_b64"]) == 1
            assert started == ["job-1"] and not first.done()
        finally:
            release.set()
        assert first.result(timeout=DEADLINE_S) == {"ok": True, "job_id": "job-1"}
    assert celery_app._finetune_slots.running == 0


def test_a_caller_that_went_away_stops_the_request_at_the_next_step(runtime):
    flagged: set[str] = set()  # stands in for the API's Redis flags (see test_api_tenant_limits)
    runtime.cancel_watcher = CancelWatcher(lambda ids: [i for i in ids if i in flagged], 0.05).start()
    task = GenerateTask(request_id="c", tenant="1", class_labels=[0, 1], seed=1, steps=1000)
    box: dict = {}

    def run():
        try:
            runtime.generate(task)
        except GenerationCancelled as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    engine = runtime.engine
    deadline = time.monotonic() + DEADLINE_S
    while engine.stats()["active_requests"] == 0 or engine.steps_run < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    flagged.add("c")
    thread.join(DEADLINE_S)
    assert isinstance(box.get("error"), GenerationCancelled)
    while engine.stats()["active_requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert engine.steps_run < 1000  # it left the batch long before its last step
    runtime.cancel_watcher.stop()
