"""/healthz, /readyz, /metrics."""

from __future__ import annotations

import logging

from difffit.errors import EngineDead
from service.deps import get_queue
from service.main import create_app

from .conftest import worker_stats


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_healthz_needs_no_backend(settings):
    # No registry reachable, no queue: still alive.
    from fastapi.testclient import TestClient

    broken = settings.model_copy(update={"database_url": "postgresql+psycopg2://x@127.0.0.1:9/x"})
    with TestClient(create_app(broken)) as c:
        assert c.get("/healthz").status_code == 200


def test_readyz_ok(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {
        "status": "ready",
        "checks": {"registry": "ok", "blobs": "ok", "redis": "ok", "workers": "ok"},
        "workers_down": [],
    }


def test_readyz_503_when_redis_down(client, fake_queue, assert_problem):
    fake_queue.down = True
    body = assert_problem(client.get("/readyz"), 503, "backend-unavailable")
    # Workers are read from Redis: unknown while it is down.
    assert body["checks"] == {"registry": "ok", "blobs": "ok", "redis": "down", "workers": "unknown"}
    assert body["failed"] == ["redis", "workers"]


def test_readyz_503_without_a_live_worker(client, fake_queue, assert_problem):
    fake_queue.workers = []
    body = assert_problem(client.get("/readyz"), 503, "backend-unavailable")
    assert body["checks"] == {"registry": "ok", "blobs": "ok", "redis": "ok", "workers": "down"}
    assert body["failed"] == ["workers"]


def test_readyz_503_naming_the_worker_whose_engine_died(client, fake_queue, assert_problem):
    fake_queue.workers = [worker_stats("w1@host", engine_alive=False)]
    body = assert_problem(client.get("/readyz"), 503, "backend-unavailable")
    assert body["checks"]["workers"] == "down" and body["failed"] == ["workers"]
    assert body["workers_down"] == ["w1@host"]


def test_readyz_names_a_dead_worker_but_stays_ready_while_another_serves(client, fake_queue):
    fake_queue.workers = [worker_stats("w1@host", engine_alive=False), worker_stats("w2@host")]
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"]["workers"] == "ok" and resp.json()["workers_down"] == ["w1@host"]


def test_an_engine_dead_generate_is_a_503_with_retry_after(client, fake_queue, acme, assert_problem):
    def die(task):
        raise EngineDead("the worker's engine died (RuntimeError: boom); the worker restarts")

    fake_queue.on_generate = die
    resp = client.post("/generate?class=0", headers=acme.headers)
    body = assert_problem(resp, 503, "engine-dead")
    assert resp.headers["Retry-After"] and "restarting" in body["detail"]


def test_not_ready_is_logged_as_info_but_a_backend_fault_elsewhere_as_error(
    client, fake_queue, acme, caplog, assert_problem
):
    # Probes poll /readyz while the service starts: those answers must not fill the log with errors.
    fake_queue.workers = []
    with caplog.at_level(logging.INFO, logger="difffit.service"):
        assert_problem(client.get("/readyz"), 503, "backend-unavailable")
        fake_queue.down = True
        assert_problem(client.post("/generate?class=0", headers=acme.headers), 503, "backend-unavailable")
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if "server-side error" in r.getMessage()]
    assert levels[0] == (logging.INFO, "server-side error backend-unavailable: Not ready: workers down.")
    assert levels[-1][0] == logging.ERROR and "Not ready" not in levels[-1][1]


def test_readyz_503_when_the_database_is_down(settings, fake_queue, make_client, assert_problem):
    from adapters_store import Registry

    broken = Registry("postgresql+psycopg2://x@127.0.0.1:9/x")
    with make_client(settings, broken, fake_queue) as c:
        body = assert_problem(c.get("/readyz"), 503, "backend-unavailable")
    assert body["checks"]["registry"] == "down" and body["failed"] == ["registry"]


def test_readyz_503_with_the_real_queue_client(settings, registry, assert_problem):
    # The real QueueClient against a port where nothing listens.
    from fastapi.testclient import TestClient

    app = create_app(settings)
    app.state.registry = registry
    with TestClient(app) as c:
        body = assert_problem(c.get("/readyz"), 503, "backend-unavailable")
    assert body["checks"]["redis"] == "down"
    assert get_queue not in app.dependency_overrides


def test_metrics_histogram_by_route_template(client, acme):
    client.get("/healthz")
    client.get("/jobs/abc", headers=acme.headers)  # 404
    client.get("/jobs/def", headers=acme.headers)
    client.get("/no/such/path")
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert "# TYPE difffit_http_request_duration_seconds histogram" in text
    assert (
        'difffit_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"} 1.0' in text
    )
    assert (
        'difffit_http_request_duration_seconds_count{method="GET",route="/jobs/{job_id}",'
        'status="404"} 2.0' in text
    )
    assert 'route="<unmatched>"' in text
    assert "/jobs/abc" not in text
    # A small registry of its own: no default process/platform collectors.
    assert "process_cpu_seconds_total" not in text and "python_gc" not in text
