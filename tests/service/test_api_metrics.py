"""/metrics: backend gauges read at scrape time (Redis, workers, registry).

The request histogram is covered by ``test_api_health.py``; here the
custom collector: fresh values on every scrape, sums over live workers,
and a scrape that still answers 200 when Redis or the database is down.
"""

from __future__ import annotations

import re

import redis

from difffit import contract

from .conftest import publish_worker, worker_stats


def _value(text: str, name: str, labels: str = "") -> float:
    """The sample ``name{labels}`` of an exposition text."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in:\n{text}"
    return float(m.group(1))


def test_backend_gauges_from_the_fake_queue_and_registry(client, acme, fake_queue, registry):
    fake_queue.depths = {"generate": 3, "finetune": 1}
    fake_queue.workers = [
        worker_stats("w1", hits=5, misses=2, evictions=1, active_requests=4, last_batch_rows=8, slots=16),
        worker_stats(
            "w2", hits=1, misses=1, active_requests=0, last_batch_rows=2, slots=16, engine_alive=False
        ),
    ]
    registry.create_job(acme.record.id, "fungi", request={}, total_steps=5)
    text = client.get("/metrics").text
    assert _value(text, "difffit_workers_engine_dead") == 1
    assert _value(text, "difffit_redis_up") == 1
    assert _value(text, "difffit_registry_up") == 1
    assert _value(text, "difffit_queue_depth", '{queue="generate"}') == 3
    assert _value(text, "difffit_queue_depth", '{queue="finetune"}') == 1
    assert _value(text, "difffit_workers_alive") == 2
    assert _value(text, "difffit_adapter_cache_hits") == 6
    assert _value(text, "difffit_adapter_cache_misses") == 3
    assert _value(text, "difffit_adapter_cache_evictions") == 1
    assert _value(text, "difffit_engine_active_requests") == 4
    assert _value(text, "difffit_engine_last_batch_rows") == 10
    assert _value(text, "difffit_adapter_slots") == 32
    assert _value(text, "difffit_jobs", '{state="queued"}') == 1
    assert _value(text, "difffit_jobs", '{state="failed"}') == 0

    # Fresh per scrape: nothing cached between two scrapes.
    fake_queue.depths = {"generate": 0}
    fake_queue.workers = []
    text = client.get("/metrics").text
    assert _value(text, "difffit_queue_depth", '{queue="generate"}') == 0
    assert _value(text, "difffit_workers_alive") == 0
    assert _value(text, "difffit_adapter_cache_hits") == 0


def test_scrape_with_redis_down_is_200(client, fake_queue):
    fake_queue.down = True
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert _value(resp.text, "difffit_redis_up") == 0
    assert _value(resp.text, "difffit_registry_up") == 1
    assert "difffit_queue_depth{" not in resp.text and "difffit_workers_alive " not in resp.text
    assert "difffit_http_request_duration_seconds" in resp.text


def test_scrape_with_the_real_client_and_nothing_listening(settings, registry):
    # The real QueueClient against a closed port: connection refused, 200 and redis_up 0.
    from fastapi.testclient import TestClient

    from service.main import create_app

    app = create_app(settings)
    app.state.registry = registry
    with TestClient(app) as c:
        resp = c.get("/metrics")
    assert resp.status_code == 200 and _value(resp.text, "difffit_redis_up") == 0


def test_scrape_with_the_database_down_is_200(settings, fake_queue, make_client):
    from adapters_store import Registry

    with make_client(settings, Registry("postgresql+psycopg2://x@127.0.0.1:9/x"), fake_queue) as c:
        resp = c.get("/metrics")
    assert resp.status_code == 200
    assert _value(resp.text, "difffit_registry_up") == 0 and _value(resp.text, "difffit_redis_up") == 1
    assert "difffit_jobs{" not in resp.text


def test_real_redis_depths_and_worker_keys(settings, registry, redis_url):
    from fastapi.testclient import TestClient

    from service.main import create_app

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.rpush(contract.GENERATE_QUEUE, b"{}", b"{}")
    publish_worker(r, worker_stats("w1", hits=7, last_batch_rows=3))
    publish_worker(r, worker_stats("w2", hits=1, last_batch_rows=4))
    app = create_app(settings.model_copy(update={"redis_url": redis_url}))
    app.state.registry = registry
    with TestClient(app) as c:
        text = c.get("/metrics").text
    r.close()
    assert _value(text, "difffit_queue_depth", '{queue="generate"}') == 2
    assert _value(text, "difffit_queue_depth", '{queue="finetune"}') == 0
    assert _value(text, "difffit_workers_alive") == 2
    assert _value(text, "difffit_adapter_cache_hits") == 8
    assert _value(text, "difffit_engine_last_batch_rows") == 7
