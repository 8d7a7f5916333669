"""The adapter bank: S device-resident slots with LRU eviction.

Slot 0 is the base. Slots are keyed by the adapter version's content hash,
never by name, so a replaced or deleted adapter (a new hash, or none) can
never be served from a stale slot. A slot in use by a running request is
pinned and never evicted; one forgotten while pinned is freed by its last
release.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch

from core.adapter.model import DiffFitDiT


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

    def acquire(self, key: str | None, tensors: dict[str, torch.Tensor] | None) -> int | None:
        """Pin the slot holding `key`, loading `tensors` into a free or evicted one.

        Returns None when every slot is pinned (the caller retries next step).
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
        if tensors is None:
            raise KeyError(f"adapter {key[:12]} is not resident and no tensors were given")
        slot = self._take_slot()
        if slot is None:
            return None
        started = time.perf_counter()
        self.model.load_slot(slot, tensors)
        self.load_seconds.append(time.perf_counter() - started)
        self._lru[key] = slot
        self._pins[slot] += 1
        self.misses += 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin a slot acquired earlier; the last release of a forgotten slot frees it."""
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and slot in self._forgotten:
            self._forgotten.discard(slot)
            self._free.append(slot)

    def forget(self, key: str) -> None:
        """Drop a hash from the bank: its slot is free now, or at its last release if pinned."""
        slot = self._lru.pop(key, None)
        if slot is None:
            return
        if self._pins[slot] == 0:
            self._free.append(slot)
        else:
            self._forgotten.add(slot)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, slot in self._lru.items():  # oldest first
            if self._pins[slot] == 0:
                del self._lru[key]
                self.evictions += 1
                return slot
        return None

    def stats(self) -> dict:
        return {
            "slots": self.model.slots,
            "resident": len(self._lru),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
