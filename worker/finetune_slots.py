"""The per-worker cap of concurrent fine-tunes, so generate tasks always find a thread.

Fine-tune and generate tasks share one pool of Celery task threads
(DIFFFIT_ENGINE_THREADS). A fine-tune holds its thread for minutes, so
without a cap a handful of jobs leave no thread to take a generate task.
A fine-tune task that finds the cap taken gives its message back (a copy is
requeued with a countdown and the original acked, see worker.tasks)
without touching the job's registry state: the job stays `queued`.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def effective_cap(max_concurrent: int, threads: int) -> int:
    """The cap actually used: at least one fine-tune, and at least one thread left for generates."""
    cap = max(1, min(max_concurrent, threads - 1))
    if cap != max_concurrent:
        log.warning(
            "DIFFFIT_MAX_CONCURRENT_FINETUNES=%d with %d task threads: using %d", max_concurrent, threads, cap
        )
    return cap


class FinetuneSlots:
    """A counter of running fine-tunes with a non-blocking take (never parks a thread)."""

    def __init__(self, cap: int):
        self.cap = cap
        self._running = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._running >= self.cap:
                return False
            self._running += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._running = max(0, self._running - 1)

    @property
    def running(self) -> int:
        return self._running
