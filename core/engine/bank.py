"""The adapter bank: S device-resident slots with LRU eviction, sized by memory.

Slot 0 is the base. Slots are keyed by the adapter version's content hash,
never by name, so a replaced or deleted adapter (a new hash, or none) can
never be served from a stale slot. A slot in use by a running request is
pinned and never evicted; one forgotten while pinned is freed by its last
release. An adapter needs a free slot *and* room for its class rows in the
ragged row store (a 1000-class adapter takes 1001 rows, a 10-class one 11):
LRU adapters are evicted until both are there.

Loads run on the engine thread between steps and complete (or, on CUDA, are
stream-ordered) before the hash maps to the slot, so no forward reads a
half-written or stale slot; compaction moves rows of live slots together
with their offsets.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from core.adapter.model import DiffFitDiT
from core.adapter.store import PackedAdapter


class SlotBank:
    """Maps content hashes to slots of a :class:`DiffFitDiT`. Engine thread only."""

    def __init__(self, model: DiffFitDiT):
        self.model = model
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._pins = [0] * model.slots
        self._free = list(range(model.slots - 1, 0, -1))
        self._forgotten: set[int] = set()  # pinned slots whose key was forgotten
        self.hits = self.misses = self.evictions = 0
        self.load_seconds: list[float] = []

    def resident(self, key: str) -> bool:
        return key in self._lru

    def acquire(self, key: str | None, adapter: dict[str, torch.Tensor] | PackedAdapter | None) -> int | None:
        """Pin the slot holding `key`, loading `adapter` into a free or evicted one.

        Returns None when every slot (or the class rows it needs) is pinned
        by running requests; the caller retries next step.
        """
        if key is None:
            self._pins[0] += 1
            return 0
        slot = self._lru.get(key)
        if slot is not None:
            self._lru.move_to_end(key)
            self._pins[slot] += 1
            self.hits += 1
            return slot
        if adapter is None:
            raise KeyError(f"adapter {key[:12]} is not resident and no tensors were given")
        packed = adapter if isinstance(adapter, PackedAdapter) else self.model.pack(adapter)
        if not self._make_room(packed.table.shape[0]):
            return None
        slot = self._free.pop()
        started = time.perf_counter()
        try:
            self.model.load_slot(slot, packed)
        except BaseException:
            self.model.unload_slot(slot)
            self._free.append(slot)
            raise
        self.load_seconds.append(time.perf_counter() - started)
        del self.load_seconds[:-1000]
        self._lru[key] = slot
        self._pins[slot] += 1
        self.misses += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot acquired earlier; the last release of a forgotten slot frees it."""
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and slot in self._forgotten:
            self._forgotten.discard(slot)
            self._unload(slot)

    def forget(self, key: str) -> None:
        """Drop a hash from the bank: its slot is free now, or at its last release if pinned."""
        slot = self._lru.pop(key, None)
        if slot is None:
            return
        if self._pins[slot] == 0:
            self._unload(slot)
        else:
            self._forgotten.add(slot)

    def _unload(self, slot: int) -> None:
        self.model.unload_slot(slot)
        self._free.append(slot)

    def _make_room(self, rows: int) -> bool:
        """Evict LRU unpinned adapters until a slot and `rows` class rows are free."""
        store = self.model.row_store
        while not (self._free and store.fits(rows)):
            victim = next((k for k, s in self._lru.items() if self._pins[s] == 0), None)
            if victim is None:
                return False
            self._unload(self._lru.pop(victim))
            self.evictions += 1
        return True

    def stats(self) -> dict:
        store = self.model.row_store
        return {
            "slots": self.model.slots,
            "resident": len(self._lru),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "table_rows": store.capacity,
            "table_rows_free": store.free_rows,
        }
