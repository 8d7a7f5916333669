"""Liveness, readiness and metrics (no authentication)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from difffit.errors import BackendUnavailable
from service.deps import BlobStoreDep, QueueDep, RegistryDep
from service.errors import problem_responses
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive (checks nothing else)")
async def healthz() -> Health:
    return Health()


def _workers_probe(queue: Any, down: list[str]) -> Callable[[], None]:
    def probe() -> None:
        workers = queue.live_workers()
        # A worker whose engine died says so until it exits and its record expires
        # or a restarted one replaces it: named, and not counted as live.
        down.extend(w.hostname for w in workers if not w.engine_alive)
        if not any(w.engine_alive for w in workers):
            raise BackendUnavailable("No live worker.")

    return probe


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The registry, the blob store, Redis and at least one worker answer",
    description="Checks, in order: `registry` (SELECT 1), `blobs` (the blob folder is writable / "
    "the S3 bucket answers HEAD), `redis` (PING) and `workers` (at least one live worker stats "
    "key in Redis whose engine is alive). 503 problem with `checks` naming each one `ok`, `down` "
    "or, for workers while Redis is down, `unknown`. `workers_down` names the workers that "
    "reported their engine dead (they exit and are restarted); 503 only when no worker is live.",
    responses=problem_responses(503),
)
async def readyz(registry: RegistryDep, blobs: BlobStoreDep, queue: QueueDep) -> Readiness:
    checks: dict[str, str] = {}
    failed: list[str] = []
    down: list[str] = []
    for name, probe in (
        ("registry", registry.ping),
        ("blobs", blobs.ping),
        ("redis", queue.ping),
        ("workers", _workers_probe(queue, down)),
    ):
        if name == "workers" and checks.get("redis") != "ok":
            checks[name] = "unknown"  # read from Redis: nothing to say while it is down
            failed.append(name)
            continue
        try:
            await run_in_threadpool(probe)
            checks[name] = "ok"
        except Exception:
            checks[name] = "down"
            failed.append(name)
    if failed:
        err = BackendUnavailable(f"Not ready: {', '.join(f'{n} {checks[n]}' for n in failed)}.")
        err.problem_extra = {"checks": checks, "failed": failed, "workers_down": down}  # type: ignore[attr-defined]
        # Probes poll this while the service starts: an answer, not a fault.
        err.log_level = logging.INFO  # type: ignore[attr-defined]
        raise err
    return Readiness(checks=checks, workers_down=down)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Request latency of this API process, plus queue depths, live workers, summed "
    "engine statistics and jobs per state read from Redis and the registry at scrape time. "
    "Answers 200 even when a backend is down (`difffit_redis_up 0`, `difffit_registry_up 0`).",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request, registry: RegistryDep, queue: QueueDep) -> Response:
    body, content_type = await run_in_threadpool(request.app.state.metrics.render, queue, registry)
    return Response(content=body, media_type=content_type)
