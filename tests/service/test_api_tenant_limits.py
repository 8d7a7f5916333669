"""Per-tenant limits (429 + Retry-After) and a client that goes away cancelling its generate.

Real Redis (the ``redis_url`` fixture) for the counting and the cancel flag; a
real uvicorn for the disconnect, since only a real server sees a client go.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from difffit import contract
from difffit.errors import Overloaded
from launch.embedded import free_port
from service.main import create_app
from service.queue import TENANT_GENERATES_KEY, QueueClient
from worker.cancellation import redis_source

DEADLINE_S = 30.0
BODY = {"dataset_url": "https://data.example/fungi.zip", "adapter": "fungi", "steps": 20}


@pytest.fixture
def limited(settings, redis_url, redis_client):
    return settings.model_copy(
        update={
            "redis_url": redis_url,
            "tenant_max_queued_generates": 2,
            "tenant_max_queued_finetunes": 2,
            "generate_timeout_s": 0.3,
        }
    )


def test_queue_counts_a_tenants_generates_and_flags_cancels(limited, redis_client):
    queue = QueueClient(limited)
    try:
        queue.admit_tenant_generate("7", "7-a", limit=2, hold_s=60, retry_after_s=5)
        queue.admit_tenant_generate("7", "7-b", limit=2, hold_s=60, retry_after_s=5)
        with pytest.raises(Overloaded, match="DIFFFIT_TENANT_MAX_QUEUED_GENERATES=2") as err:
            queue.admit_tenant_generate("7", "7-c", limit=2, hold_s=60, retry_after_s=5)
        assert err.value.retry_after_s == 5
        assert redis_client.zcard(TENANT_GENERATES_KEY.format("7")) == 2  # the refused one is not left
        queue.admit_tenant_generate("8", "8-a", limit=2, hold_s=60, retry_after_s=5)  # another tenant
        queue.release_tenant_generate("7", "7-a")
        queue.admit_tenant_generate("7", "7-c", limit=2, hold_s=60, retry_after_s=5)
        # An entry past its hold (an API process died mid-wait) stops counting.
        redis_client.zadd(TENANT_GENERATES_KEY.format("7"), {"7-b": time.time() - 1})
        queue.admit_tenant_generate("7", "7-d", limit=2, hold_s=60, retry_after_s=5)

        flagged = redis_source(limited.redis_url)  # what the worker's CancelWatcher reads
        assert flagged(["7-c", "7-d"]) == []
        queue.cancel_generate("7-c")
        assert flagged(["7-c", "7-d"]) == ["7-c"]
        ttl = redis_client.ttl(contract.GENERATE_CANCEL_KEY.format("7-c"))
        assert 0 < ttl <= contract.GENERATE_CANCEL_TTL_S
    finally:
        queue.close()


def test_generate_is_429_per_tenant_with_retry_after(
    make_client, limited, registry, acme, other, assert_problem
):
    queue = QueueClient(limited)
    with make_client(limited, registry, queue) as client:
        # No worker: each request waits out its 0.3 s (504) and keeps counting, still queued.
        for _ in range(2):
            assert_problem(client.post("/generate?class=0", headers=acme.headers), 504, "generation-timeout")
        resp = client.post("/generate?class=0", headers=acme.headers)
        body = assert_problem(resp, 429, "overloaded")
        assert resp.headers["retry-after"] == "5" and body["retry_after_s"] == 5
        assert "DIFFFIT_TENANT_MAX_QUEUED_GENERATES=2" in body["detail"]
        # Another tenant is not held back by acme's backlog.
        assert_problem(client.post("/generate?class=0", headers=other.headers), 504, "generation-timeout")
    queue.close()


def test_finished_generates_stop_counting(make_client, limited, registry, acme, fake_queue):
    with make_client(limited, registry, fake_queue) as client:
        for _ in range(3):  # limit 2: each one's count is released when its images come back
            assert client.post("/generate?class=0", headers=acme.headers).status_code == 200
    assert fake_queue.tenant_generates[str(acme.record.id)] == set()


def test_finetune_is_429_per_tenant_with_retry_after(
    make_client, limited, registry, acme, other, fake_queue, assert_problem
):
    with make_client(limited, registry, fake_queue) as client:
        ids = [client.post("/finetune", headers=acme.headers, json=BODY).json()["id"] for _ in range(2)]
        resp = client.post("/finetune", headers=acme.headers, json=BODY)
        body = assert_problem(resp, 429, "overloaded")
        assert resp.headers["retry-after"] == "30" and body["retry_after_s"] == 30
        assert "DIFFFIT_TENANT_MAX_QUEUED_FINETUNES=2" in body["detail"]
        assert len(fake_queue.finetunes) == 2  # nothing recorded or queued for the refused one
        assert client.post("/finetune", headers=other.headers, json=BODY).status_code == 202
        registry.update_job(ids[0], state="succeeded")  # a finished job frees its place
        assert client.post("/finetune", headers=acme.headers, json=BODY).status_code == 202


def test_a_client_that_disconnects_cancels_its_generate(limited, registry, acme, redis_client):
    settings = limited.model_copy(update={"generate_timeout_s": 60.0})
    app = create_app(settings)
    app.state.registry = registry
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        tenant_key = TENANT_GENERATES_KEY.format(acme.record.id)
        # No worker runs: the request waits; the client gives up once it is queued and counted.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/generate?class=0", headers=acme.headers, timeout=1.0)
        assert redis_client.llen(contract.GENERATE_QUEUE) == 1
        flags = []
        while not flags or redis_client.zcard(tenant_key):
            assert time.monotonic() < deadline, "the API never flagged the task as cancelled"
            time.sleep(0.05)
            flags = list(redis_client.scan_iter(match=contract.GENERATE_CANCEL_KEY.format("*")))
        task_id = flags[0].decode().rsplit(":", 1)[1]
        assert task_id.startswith(f"{acme.record.id}-")
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
