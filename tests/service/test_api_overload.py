"""Overload: bounded queues (real Redis), bounded waiting, 504 that loses nothing.

The API refuses work it cannot hold instead of letting a backlog or a crowd
of waiting requests grow without bound: 429 + Retry-After, before anything
is enqueued or recorded. A request that was accepted but outlived its wait
is a 504 whose task stays queued and whose result can still be polled.
"""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from difffit import contract
from service.main import create_app
from service.routes.generate import _WaitLimiters

from .conftest import BASE_CLASSES

BODY = {"dataset_url": "https://data.example/fungi.zip", "adapter": "fungi", "steps": 20}


@pytest.fixture
def real_client(settings, registry, redis_url, redis_client):
    """The app with the real QueueClient on the test redis-server; small limits."""
    s = settings.model_copy(
        update={
            "redis_url": redis_url,
            "max_queued_generate": 2,
            "max_queued_finetune": 1,
            "generate_timeout_s": 0.3,
        }
    )
    app = create_app(s)
    app.state.registry = registry
    with TestClient(app) as c:
        yield c


def test_generate_is_429_when_the_generate_queue_is_full(real_client, acme, redis_client, assert_problem):
    redis_client.rpush(contract.GENERATE_QUEUE, b"{}", b"{}")  # two tasks nobody took yet
    resp = real_client.post("/generate?class=0", headers=acme.headers)
    body = assert_problem(resp, 429, "overloaded")
    assert resp.headers["retry-after"] == "5" and body["retry_after_s"] == 5
    assert "generate queue is full" in body["detail"]
    assert redis_client.llen(contract.GENERATE_QUEUE) == 2  # nothing was added


def test_finetune_is_429_when_the_finetune_queue_is_full(
    real_client, acme, redis_client, registry, assert_problem
):
    redis_client.rpush(contract.FINETUNE_QUEUE, b"{}")
    resp = real_client.post("/finetune", headers=acme.headers, json=BODY)
    assert_problem(resp, 429, "overloaded")
    assert int(resp.headers["retry-after"]) >= 1
    assert registry.list_jobs(acme.record.id) == []  # refused before any job was recorded
    redis_client.delete(contract.FINETUNE_QUEUE)
    assert real_client.post("/finetune", headers=acme.headers, json=BODY).status_code == 202
    assert redis_client.llen(contract.FINETUNE_QUEUE) == 1


def test_a_wait_that_runs_out_is_504_and_the_task_stays_pollable(
    real_client, acme, redis_client, assert_problem
):
    # No worker: the wait runs out, but the task is queued and its result stays readable.
    t0 = time.monotonic()
    body = assert_problem(
        real_client.post("/generate?class=3", headers=acme.headers), 504, "generation-timeout"
    )
    assert time.monotonic() - t0 < 5
    task_id = body["task_id"]
    assert body["poll"] == f"/generate/{task_id}"
    assert redis_client.llen(contract.GENERATE_QUEUE) == 1
    poll = real_client.get(body["poll"], headers=acme.headers).json()
    assert poll["state"] == "pending"
    # A worker finishes it later (written the way its result backend does).
    queue = real_client.app.state.queue
    result = {"images_png_b64": ["aGk="], "seconds": 1.0}
    queue.celery.backend.store_result(task_id, {"ok": True, "result": result}, "SUCCESS")
    for _ in range(2):  # polling does not consume the result
        poll = real_client.get(body["poll"], headers=acme.headers).json()
        assert poll["state"] == "succeeded" and poll["images"] == ["aGk="]


def test_waiting_requests_per_process_are_bounded(client, acme, fake_queue, assert_problem):
    # One request may wait at a time here; a second one is refused at once, not queued.
    client.app.state.generate_limiters = _WaitLimiters(1)
    release = threading.Event()

    def slow(task):
        assert release.wait(10)
        return contract.GenerateResult(images_png_b64=[], seconds=0.1)

    fake_queue.on_generate = slow
    h = {**acme.headers, "Accept": "application/json"}
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=client.post("/generate?class=0", headers=h)))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not fake_queue.generated and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        resp = client.post("/generate?class=1", headers=h)
        assert time.monotonic() - t0 < 2
        assert_problem(resp, 429, "overloaded")
        assert resp.headers["retry-after"]
        assert len(fake_queue.generated) == 1  # the refused one was never enqueued
    finally:
        release.set()
        t.join(10)
    assert first["r"].status_code == 200
    # The slot is free again.
    fake_queue.on_generate = None
    assert client.post("/generate?class=Bag", headers=h).json()["class_name"] == BASE_CLASSES[8]
