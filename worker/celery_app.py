"""The Celery app of the workers: `celery -A worker.celery_app worker ...`.

Long fine-tuning jobs need late acks (a task is acknowledged only when it
ends), requeue on worker loss, prefetch 1, and a Redis visibility timeout
above the longest job, or Redis redelivers them while they still run.
The thread pool lets many generate tasks reach the one engine thread at
once, so they batch; never use prefork with CUDA in the parent. Fine-tunes
share that pool, capped per worker (worker.finetune_slots) so generates
always find a thread.
"""

from __future__ import annotations

import gc
import logging
import threading

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown

from difffit.contract import FINETUNE_QUEUE, FINETUNE_TASK, GENERATE_QUEUE, GENERATE_TASK
from difffit.logging_setup import configure_logging
from difffit.settings import get_settings

log = logging.getLogger(__name__)
settings = get_settings()

app = Celery(
    "difffit-worker", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"]
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    result_expires=3600,
    task_routes={GENERATE_TASK: {"queue": GENERATE_QUEUE}, FINETUNE_TASK: {"queue": FINETUNE_QUEUE}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_runtime = None
_runtime_lock = threading.Lock()


@setup_logging.connect
def _configure_logging(**_):
    # Our JSON lines (with job and task ids) instead of Celery's own format.
    configure_logging(settings.log_level, settings.log_json)


def get_runtime():
    """The process's Runtime (engine + registry + blobs), built on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from worker.cancellation import CancelWatcher, redis_source
            from worker.runtime import Runtime

            runtime = Runtime(settings)
            runtime.cancel_watcher = CancelWatcher(redis_source(settings.redis_url)).start()
            # The base, its modules and the registry live as long as the process: move
            # them out of the collector's view, so a full collection (hundreds of ms over
            # a large heap) does not land inside a request's cold adapter load.
            gc.collect()
            gc.freeze()
            _runtime = runtime
        return _runtime


_lazy_lock = threading.Lock()  # not _runtime_lock: building the runtime takes a while
_finetune_slots = None


def get_finetune_slots():
    """This process's cap of concurrent fine-tunes (DIFFFIT_MAX_CONCURRENT_FINETUNES)."""
    global _finetune_slots
    with _lazy_lock:
        if _finetune_slots is None:
            from worker.finetune_slots import FinetuneSlots, effective_cap

            cap = effective_cap(settings.max_concurrent_finetunes, settings.engine_threads)
            _finetune_slots = FinetuneSlots(cap)
        return _finetune_slots


_stats = None


@worker_ready.connect
def _load_engine_early(sender=None, **_):
    # Load the base at start-up, not on the first request, then announce the worker.
    from worker.supervision import handle_engine_death, install_engine_kill_hook

    if settings.test_hooks:
        install_engine_kill_hook(lambda: _runtime.engine if _runtime is not None else None)

    def load():
        global _stats
        from worker.stats import StatsPublisher

        runtime = get_runtime()
        hostname = getattr(sender, "hostname", None) or "worker"
        queues = sorted(q.name for q in app.amqp.queues.consume_from.values()) if sender else []
        _stats = StatsPublisher(settings.redis_url, hostname, runtime, queues).start()
        runtime.engine.on_death(lambda error: handle_engine_death(error, _stats.publish))

    threading.Thread(target=load, name="difffit-load", daemon=True).start()


@worker_shutdown.connect
def _stop_engine(**_):
    dead = _runtime is not None and _runtime.engine.dead is not None
    if _stats is not None:
        # A dead engine's "down" record stays until it expires or a successor replaces it,
        # so /readyz names this worker; a clean stop just disappears.
        _stats.stop(forget=not dead)
    if _runtime is not None:
        if _runtime.cancel_watcher is not None:
            _runtime.cancel_watcher.stop()
        _runtime.engine.stop()
