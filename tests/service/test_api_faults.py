"""Redis goes away and comes back: the API answers 503 quickly, then recovers alone.

End to end through HTTP with the real QueueClient (``test_api_queue.py``
covers the client itself through an outage): while redis-server is stopped,
/generate, /finetune and /readyz are 503 problems within a few seconds (not
500, not a hang) and /metrics still answers; once a redis-server is back on
the same port, everything works again without restarting anything.
"""

from __future__ import annotations

import time

import redis
from fastapi.testclient import TestClient

from difffit import contract
from launch.embedded import free_port, start_redis, stop_process
from service.main import create_app

from .conftest import publish_worker

BODY = {"dataset_url": "https://data.example/fungi.zip", "adapter": "fungi", "steps": 20}
#: "A few seconds": connect timeouts are 1-2 s, with at most one retry.
FAST_S = 5.0


def _timed(call):
    t0 = time.monotonic()
    resp = call()
    assert time.monotonic() - t0 < FAST_S, f"took {time.monotonic() - t0:.1f} s"
    return resp


def test_redis_outage_is_503_then_recovers_without_restarts(
    settings, registry, acme, add_version, tmp_path, assert_problem
):
    add_version(acme, "fungi")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis(port, tmp_path / "redis", persistent=False)
    app = create_app(settings.model_copy(update={"redis_url": url, "generate_timeout_s": 0.3}))
    app.state.registry = registry
    h = acme.headers
    try:
        with TestClient(app) as c:
            r = redis.Redis.from_url(url)
            publish_worker(r)
            assert c.get("/readyz").status_code == 200

            stop_process(proc, timeout_s=5)
            for path in ("/generate?class=0", "/generate?adapter=fungi&class=amanita"):
                assert_problem(_timed(lambda p=path: c.post(p, headers=h)), 503, "backend-unavailable")
            assert_problem(
                _timed(lambda: c.post("/finetune", headers=h, json=BODY)), 503, "backend-unavailable"
            )
            assert registry.list_jobs(acme.record.id) == []  # nothing half-accepted
            ready = assert_problem(_timed(lambda: c.get("/readyz")), 503, "backend-unavailable")
            assert ready["checks"]["redis"] == "down"
            metrics = _timed(lambda: c.get("/metrics"))
            assert metrics.status_code == 200 and "difffit_redis_up 0.0" in metrics.text

            # Back on the same port (empty: not persistent); the worker republishes its stats.
            proc = start_redis(port, tmp_path / "redis", persistent=False)
            publish_worker(r)
            assert _timed(lambda: c.get("/readyz")).status_code == 200
            job = c.post("/finetune", headers=h, json=BODY)
            assert job.status_code == 202, job.text
            assert r.llen(contract.FINETUNE_QUEUE) == 1
            # No worker consumes here, so the wait runs out: accepted, queued and pollable.
            timeout = assert_problem(c.post("/generate?class=Coat", headers=h), 504, "generation-timeout")
            assert r.llen(contract.GENERATE_QUEUE) == 1
            assert c.get(timeout["poll"], headers=h).json()["state"] == "pending"
            assert "difffit_redis_up 1.0" in c.get("/metrics").text
            r.close()
    finally:
        stop_process(proc, timeout_s=5)
