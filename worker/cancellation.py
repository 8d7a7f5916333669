"""Whether a generate's caller went away: the flag the API sets in Redis.

The API writes ``GENERATE_CANCEL_KEY.format(task_id)`` when the HTTP client
disconnects; the task thread waiting on the engine polls it (see
Runtime.generate) and cancels the request's future, which takes it out of
the batch at the next step. Redis trouble reads as "not cancelled": the
request then runs to its end or to the worker's timeout, as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from difffit.contract import GENERATE_CANCEL_KEY

log = logging.getLogger(__name__)


class CancelFlags:
    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self._redis: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1)
            return self._redis

    def probe(self, task_id: str) -> Callable[[], bool]:
        key = GENERATE_CANCEL_KEY.format(task_id)

        def cancelled() -> bool:
            try:
                return bool(self._client().exists(key))
            except Exception as exc:  # noqa: BLE001 - see the module docstring
                log.debug("cancel flag of %s unreadable: %s", task_id, exc)
                return False

        return cancelled
