"""Generate requests whose caller went away: one watcher per worker cancels them.

The API writes ``GENERATE_CANCEL_KEY.format(task_id)`` when the HTTP client
disconnects. One thread per worker checks the ids of the requests its task
threads wait on (one Redis round trip every ``interval_s``) and cancels the
futures of those flagged; the engine drops a cancelled request at the next
step and the waiting task thread ends with GenerationCancelled. One watcher
rather than a poll per task thread: a hundred threads waking to ask would
take the GIL from the engine thread many times a second. Redis trouble
reads as "nothing cancelled": the request then runs to its end or to the
worker's timeout, as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

from difffit.contract import GENERATE_CANCEL_KEY

log = logging.getLogger(__name__)

#: ids -> the subset flagged as cancelled
Source = Callable[[list[str]], Iterable[str]]


def redis_source(redis_url: str) -> Source:
    """Reads the API's cancel flags: one pipeline of EXISTS per check."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1)

    def flagged(ids: list[str]) -> list[str]:
        pipe = client.pipeline(transaction=False)
        for task_id in ids:
            pipe.exists(GENERATE_CANCEL_KEY.format(task_id))
        return [t for t, hit in zip(ids, pipe.execute(), strict=True) if hit]

    return flagged


class CancelWatcher:
    def __init__(self, source: Source, interval_s: float = 0.5):
        self.source, self.interval_s = source, interval_s
        self._watched: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="difffit-cancel-watch", daemon=True)

    def start(self) -> CancelWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @contextlib.contextmanager
    def watch(self, task_id: str, future: Future) -> Iterator[None]:
        """Cancel `future` if `task_id` is flagged while the block runs."""
        with self._lock:
            self._watched[task_id] = future
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(task_id, None)

    def check(self) -> int:
        """One pass: cancel the watched futures whose ids are flagged; how many were."""
        with self._lock:
            watched = dict(self._watched)
        if not watched:
            return 0
        try:
            flagged = list(self.source(list(watched)))
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            log.warning("cancel flags unreadable: %s", exc)
            return 0
        for task_id in flagged:
            if watched[task_id].cancel():
                log.info("generate %s cancelled: its caller went away", task_id)
        return len(flagged)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
