"""A thin Celery client: the service's only way to reach the workers.

Tasks are sent by name (:data:`difffit.contract.GENERATE_TASK`,
:data:`difffit.contract.FINETUNE_TASK`) so the service never imports the
worker package. Payloads (JSON serializer):

- generate: ``send_task(GENERATE_TASK, args=[GenerateTask.model_dump(mode="json")],
  task_id=task.request_id, queue=GENERATE_QUEUE)``
- finetune: ``send_task(FINETUNE_TASK, args=[FinetuneTask(job_id).model_dump()],
  task_id=job_id, queue=FINETUNE_QUEUE)``, i.e. ``args=[{"job_id": job_id}]``

A worker task returns ``{"ok": True, "result": GenerateResult}`` or
``{"ok": False, "error": {"code", "message"}}``; errors are rebuilt with
:func:`difffit.errors.error_from_code`.

Waiting polls the result backend (one Redis GET per poll, backing off from
10 ms to 100 ms) instead of blocking in ``AsyncResult.get``: it is safe from
many threads at once, and the API's result backend never subscribes to
Redis pub/sub (Celery's pub/sub result consumer gives up for good after a
Redis outage: "The Celery application must be restarted"). Redis
connection failures become :class:`difffit.errors.BackendUnavailable`.

Besides Celery the client reads Redis directly (one small ``redis.Redis``
with short timeouts, which reconnects by itself after an outage) for what
the API checks and exports: the depth of each queue (the Celery Redis
transport keeps one list per queue, named after it, plus one per non-zero
priority) and the live workers (each writes a
:class:`difffit.contract.WorkerStats` JSON under ``difffit:worker:<host>``
with a short TTL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery import states as celery_states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.redis import RedisBackend
from celery.result import AsyncResult

from difffit import contract
from difffit.errors import (
    BackendUnavailable,
    DiffFitError,
    GenerationCancelled,
    GenerationTimeout,
    Overloaded,
    error_from_code,
)
from difffit.settings import Settings

log = logging.getLogger("difffit.service.queue")

#: kombu's Redis transport: messages of priority p > 0 go to "<queue>\x06\x16<p>".
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_WORKER_KEY_PATTERN = contract.WORKER_STATS_KEY.format("*")
#: Per tenant, a sorted set of its generate task ids scored by when they stop counting.
TENANT_GENERATES_KEY = "difffit:tenant:{}:generates"


def _connection_errors() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions

    return (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        kombu.exceptions.OperationalError,
        ConnectionError,
        OSError,
    )


@contextmanager
def _backend_guard(what: str) -> Iterator[None]:
    try:
        yield
    except DiffFitError:
        raise
    except _connection_errors() as exc:
        log.warning("broker unreachable while %s: %s", what, exc)
        raise BackendUnavailable(f"The task queue (Redis) is unreachable while {what}.") from exc


class PollingRedisBackend(RedisBackend):
    """Redis result backend read by polling only: no pub/sub subscriptions."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None  # the default subscribes to the result channel

    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
        return result

    def remove_pending_result(self, result: Any) -> Any:
        return result

    def forget(self, task_id: str) -> None:
        BaseKeyValueStoreBackend.forget(self, task_id)


class _ApiCelery(Celery):
    def _get_backend(self) -> RedisBackend:
        return PollingRedisBackend(app=self, url=self.conf.result_backend)


def make_celery(settings: Settings) -> Celery:
    """The API-side Celery app (sends tasks, reads results; runs no tasks)."""
    app = _ApiCelery("difffit-api", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        result_backend_transport_options={
            "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}
        },
        redis_socket_connect_timeout=2,
        redis_socket_timeout=5,
        redis_retry_on_timeout=False,
        broker_connection_retry=False,
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=2,
        broker_connection_max_retries=1,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        result_extended=False,
    )
    return app


class QueueClient:
    """Sends tasks to the workers and reads their results.

    The one object routes use (injected with :func:`service.deps.get_queue`);
    tests replace it with a fake exposing the same four methods.
    """

    def __init__(self, settings: Settings, celery_app: Celery | None = None):
        self.settings = settings
        self.celery = celery_app or make_celery(settings)
        self._redis: Any = None
        self._redis_lock = threading.Lock()
        self._workers_cache: tuple[float, list[contract.WorkerStats]] | None = None

    @property
    def redis(self) -> Any:
        """A plain Redis client for reads (queue depths, worker stats, PING)."""
        if self._redis is None:
            with self._redis_lock:
                if self._redis is None:
                    import redis
                    from redis.backoff import NoBackoff
                    from redis.retry import Retry

                    self._redis = redis.Redis.from_url(
                        self.settings.redis_url,
                        socket_connect_timeout=1,
                        socket_timeout=2,
                        # One immediate retry: enough for a pooled connection that died
                        # with a Redis restart, never a multi-second backoff while it is down.
                        retry=Retry(NoBackoff(), 1),
                        health_check_interval=30,
                    )
        return self._redis

    @property
    def result_expires_s(self) -> float:
        """How long results stay in Redis (Celery's ``result_expires``, default one day)."""
        value = self.celery.conf.result_expires
        seconds = value.total_seconds() if hasattr(value, "total_seconds") else float(value or 0)
        return max(seconds, 2 * self.settings.generate_timeout_s, 60.0)

    # --- generate ---------------------------------------------------------
    def enqueue_generate(self, task: contract.GenerateTask) -> AsyncResult:
        """Send one generate request; the handle's id is ``task.request_id``."""
        with _backend_guard("enqueueing a generate request"):
            return self.celery.send_task(
                contract.GENERATE_TASK,
                args=[task.model_dump(mode="json")],
                task_id=task.request_id,
                queue=contract.GENERATE_QUEUE,
                # A request that outlived its HTTP wait can still be polled until its result
                # would expire anyway; a task nobody ran by then is dropped by the worker.
                expires=self.result_expires_s,
            )

    def wait_generate(
        self, handle: AsyncResult | str, timeout: float, stop: threading.Event | None = None
    ) -> contract.GenerateResult:
        """Block (in a worker thread) until the result arrives or ``timeout`` passes.

        Raises :class:`GenerationTimeout` (with the task id) on timeout,
        :class:`GenerationCancelled` once ``stop`` is set (the HTTP client went
        away), the worker's domain error when the task reported one, and
        :class:`BackendUnavailable` when Redis is gone.
        """
        task_id = handle if isinstance(handle, str) else handle.id
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            result = self.poll_generate(task_id)
            if result is not None:
                self._forget(task_id)
                return result
            if stop is not None and stop.is_set():
                raise GenerationCancelled(f"The caller of {task_id} went away.", task_id=task_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GenerationTimeout(
                    f"The images were not ready within {timeout:g} s; poll GET /generate/{task_id}.",
                    task_id=task_id,
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.1)

    def poll_generate(self, task_id: str) -> contract.GenerateResult | None:
        """The result if the task finished, None while it is pending or running."""
        with _backend_guard("reading a generate result"):
            meta = self.celery.backend.get_task_meta(task_id, cache=False)
        state = meta.get("status")
        if state == celery_states.SUCCESS:
            return _parse_task_value(meta.get("result"))
        if state == celery_states.REVOKED:
            raise BackendUnavailable(f"Generation request {task_id} expired before a worker picked it up.")
        if state in celery_states.PROPAGATE_STATES:
            err = meta.get("result")
            log.error("generate task %s ended in %s: %r", task_id, state, err)
            raise DiffFitError(f"Generation task {task_id} failed in the worker.")
        return None

    def cancel_generate(self, task_id: str) -> None:
        """Tell the workers nobody waits for ``task_id`` any more: it leaves the batch
        at the next step (or is skipped if not started). Best effort."""
        try:
            key = contract.GENERATE_CANCEL_KEY.format(task_id)
            self.redis.set(key, b"1", ex=contract.GENERATE_CANCEL_TTL_S)
        except Exception as exc:  # noqa: BLE001 - the worker's own timeout still bounds it
            log.warning("could not flag generate %s as cancelled: %s", task_id, exc)

    def admit_tenant_generate(
        self, tenant: str, task_id: str, limit: int, hold_s: float, retry_after_s: int
    ) -> None:
        """Count ``task_id`` against the tenant's generates for at most ``hold_s``, or
        raise :class:`Overloaded` when the tenant already has ``limit`` counted.

        Added first, then counted and taken back if over: concurrent requests
        can be refused together but never overshoot the limit. Entries expire by
        their score, so an API process that dies leaks nothing for long.
        """
        key = TENANT_GENERATES_KEY.format(tenant)
        now = time.time()
        with _backend_guard("counting the tenant's generate requests"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {task_id: now + hold_s})
            pipe.expire(key, int(hold_s) + 60)
            pipe.zcard(key)
            count = int(pipe.execute()[-1])
            if count > limit:
                self.redis.zrem(key, task_id)
                raise Overloaded(
                    f"This tenant already has {count - 1} generate requests queued or running, its limit "
                    f"(DIFFFIT_TENANT_MAX_QUEUED_GENERATES={limit}); retry in {retry_after_s} s.",
                    retry_after_s=retry_after_s,
                )

    def release_tenant_generate(self, tenant: str, task_id: str) -> None:
        """``task_id`` no longer counts against its tenant (its wait ended)."""
        try:
            self.redis.zrem(TENANT_GENERATES_KEY.format(tenant), task_id)
        except Exception as exc:  # noqa: BLE001 - the entry expires by itself
            log.debug("could not release %s of tenant %s: %s", task_id, tenant, exc)

    def _forget(self, task_id: str) -> None:
        try:
            self.celery.backend.forget(task_id)
        except Exception:  # best effort; results expire anyway
            log.debug("could not forget result %s", task_id, exc_info=True)

    # --- finetune ---------------------------------------------------------
    def enqueue_finetune(self, job_id: str) -> None:
        """Send the job to the finetune queue; the Celery task id is the job id."""
        payload = contract.FinetuneTask(job_id=job_id).model_dump(mode="json")
        with _backend_guard("enqueueing a fine-tune job"):
            self.celery.send_task(
                contract.FINETUNE_TASK,
                args=[payload],
                task_id=job_id,
                queue=contract.FINETUNE_QUEUE,
            )

    # --- backlog and workers ---------------------------------------------
    def queue_depth(self, queue: str) -> int:
        """Messages waiting in a queue (all priorities), not counting those a worker holds."""
        names = [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]
        with _backend_guard(f"reading the depth of queue {queue!r}"):
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.llen(name)
            return int(sum(pipe.execute()))

    def check_backlog(self, queue: str, limit: int, retry_after_s: int) -> int:
        """Raise :class:`Overloaded` when ``queue`` already holds ``limit`` messages.

        Returns the depth. The check and the enqueue that follows are not
        atomic, so concurrent requests may overshoot by a few; the bound is
        about not letting a backlog grow without limit, not an exact count.
        """
        depth = self.queue_depth(queue)
        if depth >= limit:
            raise Overloaded(
                f"The {queue} queue is full ({depth} waiting, limit {limit}); retry in {retry_after_s} s.",
                retry_after_s=retry_after_s,
            )
        return depth

    def live_workers(self, max_age_s: float = 0.0) -> list[contract.WorkerStats]:
        """Stats of every live worker (a ``difffit:worker:*`` key), sorted by hostname.

        ``max_age_s`` > 0 reuses a read at most that old: the per-request
        class-name lookup of ``POST /generate`` should not SCAN Redis each time.
        """
        now = time.monotonic()
        cached = self._workers_cache
        if max_age_s > 0 and cached is not None and now - cached[0] <= max_age_s:
            return cached[1]
        with _backend_guard("reading the worker stats"):
            keys = sorted(self.redis.scan_iter(match=_WORKER_KEY_PATTERN, count=500))
            values = self.redis.mget(keys) if keys else []
        workers = []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                workers.append(contract.WorkerStats.model_validate_json(raw))
            except ValueError:
                log.warning("ignoring malformed worker stats under %r", key)
        workers.sort(key=lambda w: w.hostname)
        self._workers_cache = (now, workers)
        return workers

    # --- health -----------------------------------------------------------
    def ping(self) -> None:
        """Raise :class:`BackendUnavailable` unless Redis answers PING."""
        try:
            self.redis.ping()
        except Exception as exc:
            raise BackendUnavailable("Redis (the task queue) does not answer.") from exc

    def close(self) -> None:
        try:
            self.celery.close()
        except Exception:
            log.debug("closing celery failed", exc_info=True)
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                log.debug("closing redis failed", exc_info=True)


def _parse_task_value(value: Any) -> contract.GenerateResult:
    """Turn a worker task's return value into a result or raise its error."""
    if not isinstance(value, dict) or "ok" not in value:
        raise DiffFitError("The worker returned a malformed result.")
    if value["ok"]:
        return contract.GenerateResult.model_validate(value.get("result") or {})
    err = value.get("error") or {}
    raise error_from_code(str(err.get("code", "internal")), str(err.get("message", "unknown error")))
