"""The host tier: parsed, packed adapters kept in host memory beyond the device slots.

Task threads fill it (blob read, hash check, parse, pack: all off the engine
thread), so a request whose adapter is here costs the engine only the copy
into a slot. On a CUDA worker the packed tensors are page-locked, so that
copy runs asynchronously on the stream the forwards use. LRU by bytes
(``DIFFFIT_HOST_TIER_MB``), keyed by content hash like the device slots.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from core.adapter.store import PackedAdapter


class HostTier:
    """LRU of (packed adapter, metadata) by content hash, at most `capacity_bytes`. Thread-safe."""

    def __init__(self, capacity_bytes: int, pin: bool = False):
        self.capacity_bytes = capacity_bytes
        self.pin = pin
        self._items: OrderedDict[str, tuple[PackedAdapter, dict]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> tuple[PackedAdapter, dict] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, packed: PackedAdapter, meta: dict) -> tuple[PackedAdapter, dict]:
        """Keep `packed` (pinned first on CUDA hosts); evict LRU entries over capacity.

        The newest entry stays even when it alone exceeds the capacity: the
        request that loaded it is about to use it.
        """
        if self.pin:
            packed = packed.pinned()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[0].nbytes
            self._items[key] = (packed, meta)
            self._bytes += packed.nbytes
            while self._bytes > self.capacity_bytes and len(self._items) > 1:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
        return packed, meta

    def get_or_load(
        self, key: str, load: Callable[[], tuple[PackedAdapter, dict]]
    ) -> tuple[PackedAdapter, dict]:
        """The entry for `key`, calling `load()` (outside the lock) on a miss."""
        item = self.get(key)
        if item is not None:
            return item
        return self.put(key, *load())

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def stats(self) -> dict:
        with self._lock:
            return {"host_adapters": len(self._items), "host_bytes": self._bytes, "host_hits": self.hits}
