"""Prometheus metrics of the API, on a small registry of their own.

``difffit_http_request_duration_seconds`` (histogram) is labelled by method,
route template (``/jobs/{job_id}``, never the raw path, so label values stay
few) and status code; ``difffit_http_requests_in_progress`` is a gauge.
Requests that match no route are counted under ``route="<unmatched>"``.

The state of the system behind the API is read at scrape time by
:class:`BackendCollector` (fresh values per scrape, nothing cached):

- ``difffit_redis_up`` / ``difffit_registry_up``: 1 when the backend answered
  during this scrape; when one is down its gauges below are simply absent and
  the scrape still answers 200;
- ``difffit_queue_depth{queue}``: tasks waiting in Redis per queue (LLEN);
- ``difffit_workers_alive``: workers whose stats key is present;
- ``difffit_workers_engine_dead``: of those, workers whose engine thread died
  (they exit and are restarted; one that stays means restarts keep failing);
- summed over the live workers' :class:`difffit.contract.WorkerStats`:
  ``difffit_adapter_cache_hits`` / ``_misses`` / ``_evictions`` (counters kept
  by each worker, exported as gauges because a sum over a changing set of
  workers can go down), ``difffit_adapter_slots`` / ``_resident``,
  ``difffit_engine_queue_depth``, ``difffit_engine_active_requests``,
  ``difffit_engine_training_runs``, ``difffit_engine_steps_run`` and
  ``difffit_engine_last_batch_rows``;
- ``difffit_jobs{state}``: fine-tuning jobs per state, all tenants.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from difffit import contract

log = logging.getLogger("difffit.service.metrics")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metric objects of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "difffit_http_request_duration_seconds",
            "HTTP request latency by route template and status.",
            ["method", "route", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "difffit_http_requests_in_progress",
            "HTTP requests being served.",
            registry=self.registry,
        )

    def render(self, queue: Any = None, registry: Any = None) -> tuple[bytes, str]:
        """The exposition text: the API's own metrics, then the backends' read now.

        Blocking (Redis and SQL reads): call it from a worker thread.
        """
        body = generate_latest(self.registry)
        if queue is not None or registry is not None:
            scrape = CollectorRegistry(auto_describe=False)
            scrape.register(BackendCollector(queue, registry))
            body += generate_latest(scrape)
        return body, CONTENT_TYPE_LATEST


#: WorkerStats field -> (metric name, help), each summed over the live workers.
WORKER_GAUGES = {
    "hits": ("difffit_adapter_cache_hits", "Adapter bank lookups served from a resident slot."),
    "misses": ("difffit_adapter_cache_misses", "Adapter bank lookups that loaded the adapter."),
    "evictions": ("difffit_adapter_cache_evictions", "Adapters evicted from the bank (LRU)."),
    "slots": ("difffit_adapter_slots", "Adapter slots on the devices."),
    "resident": ("difffit_adapter_resident", "Adapters resident in a slot."),
    "queue_depth": ("difffit_engine_queue_depth", "Requests waiting for an engine thread."),
    "active_requests": ("difffit_engine_active_requests", "Requests in the engines' running batches."),
    "training_runs": ("difffit_engine_training_runs", "Training runs active in the engines."),
    "steps_run": ("difffit_engine_steps_run", "Engine forward steps run."),
    "last_batch_rows": ("difffit_engine_last_batch_rows", "Rows of each engine's last forward batch."),
}
QUEUES = (contract.GENERATE_QUEUE, contract.FINETUNE_QUEUE)


class BackendCollector(Collector):
    """Reads Redis (queue depths, worker stats) and the registry (jobs) per scrape.

    ``queue`` is a :class:`service.queue.QueueClient` (or the tests' fake),
    ``registry`` an :class:`adapters_store.Registry`. Any failure of a backend
    only turns its ``*_up`` gauge to 0: a scrape never fails because of it.
    """

    def __init__(self, queue: Any, registry: Any):
        self.queue = queue
        self.registry = registry

    def describe(self) -> list[Metric]:
        return []  # no describe-time I/O: registering must not touch Redis

    def collect(self) -> Iterator[Metric]:
        if self.queue is not None:
            yield from self._collect_redis()
        if self.registry is not None:
            yield from self._collect_registry()

    def _collect_redis(self) -> Iterator[Metric]:
        def read():
            return {q: self.queue.queue_depth(q) for q in QUEUES}, self.queue.live_workers()

        up, found = _probe("difffit_redis_up", "1 if Redis answered during this scrape.", read)
        yield up
        if found is None:
            return
        depths, workers = found
        depth = GaugeMetricFamily(
            "difffit_queue_depth", "Tasks waiting in Redis per queue.", labels=["queue"]
        )
        for q, n in depths.items():
            depth.add_metric([q], n)
        yield depth
        yield GaugeMetricFamily("difffit_workers_alive", "Workers with a live stats key.", value=len(workers))
        yield GaugeMetricFamily(
            "difffit_workers_engine_dead",
            "Workers whose engine thread died (exiting, to be restarted); alert on it staying above 0.",
            value=sum(not w.engine_alive for w in workers),
        )
        for field, (name, help_text) in WORKER_GAUGES.items():
            total = sum(int(getattr(w, field, 0) or 0) for w in workers)
            yield GaugeMetricFamily(name, help_text + " Summed over live workers.", value=total)

    def _collect_registry(self) -> Iterator[Metric]:
        up, counts = _probe(
            "difffit_registry_up", "1 if the registry database answered this scrape.",
            self.registry.count_jobs_by_state,
        )  # fmt: skip
        yield up
        if counts is None:
            return
        jobs = GaugeMetricFamily("difffit_jobs", "Fine-tuning jobs per state, all tenants.", labels=["state"])
        for state, n in sorted(counts.items()):
            jobs.add_metric([state], n)
        yield jobs


def _route_template(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "<unmatched>"


class MetricsMiddleware:
    """Pure ASGI middleware (safe with streaming responses such as SSE)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.latency.labels(
                method=scope.get("method", ""), route=_route_template(scope), status=str(status)
            ).observe(time.perf_counter() - start)


def _probe(name: str, help_text: str, read):
    """Call `read()`; return an up gauge (1 or 0) and its value, or None when it failed.

    A scrape must answer 200 with the backend down, so a failure is a 0, not an error.
    """
    up = GaugeMetricFamily(name, help_text)
    try:
        value = read()
    except Exception as exc:  # noqa: BLE001 - any backend failure means "down"
        log.warning("metrics: %s is 0: %s", name, exc)
        up.add_metric([], 0)
        return up, None
    up.add_metric([], 1)
    return up, value
