"""The device tier's adapter tensors: fp32 vector bank and a ragged class-row store.

Every slot's adapter lives here, in fp32 whatever the base's dtype (a gamma
of 1.002 is 1.0 in bf16; DESIGN.md section 9):

- ``vectors`` [S, V]: per slot, each adapted layer's bias and (where a gamma
  may be placed) gamma, at fixed columns. One row per slot, so a mixed batch
  gathers every layer's rows with one ``index_select`` per forward and a slot
  loads with one copy.
- :class:`RowStore` [R, D]: the class tables of all slots concatenated; slot
  ``s`` owns rows ``offset[s] .. offset[s] + C_s`` (its null row last), so a
  10-class tenant costs 11 rows, not ``max_classes + 1``.

Engine thread only: loads, frees and compaction run between forwards, so a
forward never sees a half-written slot (on CUDA the copies are ordered on
the same stream as the forwards).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from difffit.errors import IncompatibleAdapter

# Host copies are issued in pieces below torch's parallel grain (32768 elements):
# each then runs on the calling thread, and a copy never waits on a thread pool
# whose other threads the OS has descheduled (a loaded host stalled 2.6 MB
# copies for 10-40 ms that way; in pieces, p50 0.12 ms).
_CHUNK = 32767


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for contiguous tensors of equal size; async from pinned memory on CUDA."""
    if dst.is_cuda or dst.is_meta:
        dst.copy_(src, non_blocking=True)
        return
    for d, s in zip(dst.view(-1).split(_CHUNK), src.reshape(-1).split(_CHUNK), strict=True):
        d.copy_(s)


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter parsed and laid out for one base: what the host tier keeps.

    vector [V] fp32 in the bank's column layout (gamma 1 where the adapter has
    none); table [C + 1, D] fp32; gammas: indices of the layers whose gamma is
    not implicitly 1.
    """

    vector: torch.Tensor
    table: torch.Tensor
    gammas: frozenset[int]

    @property
    def num_classes(self) -> int:
        return self.table.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return self.vector.nbytes + self.table.nbytes

    def pinned(self) -> PackedAdapter:
        """A copy in page-locked memory (CUDA hosts): host -> device copies then run async."""
        return PackedAdapter(self.vector.pin_memory(), self.table.pin_memory(), self.gammas)


class RowStore:
    """Ragged class tables: rows [R, D] fp32 with per-slot offsets.

    Free space is a sorted list of (start, length) runs, merged on release;
    when no run is long enough but enough rows are free in total,
    :meth:`compact` slides the live tables down (between forwards).
    """

    def __init__(self, capacity: int, dim: int, slots: int, device: torch.device | str):
        # zeros, not empty: free rows are never read by a forward, but no tensor of the
        # model ever holds uninitialized memory (comparing buffers never meets arbitrary bits).
        self.rows = torch.zeros(capacity, dim, dtype=torch.float32, device=device)
        self.offset = [0] * slots
        self.count = [0] * slots  # rows a slot owns (C + 1), 0 = none
        self.offsets_t = torch.zeros(slots, dtype=torch.long, device=device)
        self._free: list[tuple[int, int]] = [(0, capacity)]
        self.compactions = 0

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self._free)

    def fits(self, n: int) -> bool:
        """Whether `n` rows can be placed (after compaction if need be)."""
        return self.free_rows >= n

    def place(self, slot: int, table: torch.Tensor) -> None:
        """Write `table` [n, D] as slot `slot`'s rows (the slot must own none)."""
        n = table.shape[0]
        if self.count[slot]:
            self.release(slot)
        start = self._take(n)
        if start is None:
            if not self.fits(n):
                raise IncompatibleAdapter(
                    f"class table of {n} rows does not fit: {self.free_rows} of {self.capacity} rows free"
                )
            self.compact()
            start = self._take(n)
        copy_into(self.rows[start : start + n], table)
        self.offset[slot], self.count[slot] = start, n
        self.offsets_t[slot] = start

    def release(self, slot: int) -> None:
        """Give slot `slot`'s rows back to the free runs."""
        start, n = self.offset[slot], self.count[slot]
        if not n:
            return
        self.count[slot] = 0
        i = bisect.bisect(self._free, (start, n))
        self._free.insert(i, (start, n))
        # merge with the next run, then with the previous one
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i] = (start, n + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])

    def compact(self) -> None:
        """Slide every live table down to close the gaps; offsets follow."""
        live = sorted((self.offset[s], self.count[s], s) for s in range(len(self.count)) if self.count[s])
        cursor = 0
        for start, n, slot in live:
            if start != cursor:
                src = self.rows[start : start + n]
                # overlapping ranges: copy through a temporary
                self.rows[cursor : cursor + n].copy_(src.clone() if start - cursor < n else src)
                self.offset[slot] = cursor
            cursor += n
        self._free = [(cursor, self.capacity - cursor)] if cursor < self.capacity else []
        self.offsets_t.copy_(torch.tensor(self.offset, dtype=torch.long))
        self.compactions += 1

    def _take(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self._free):  # first fit
            if length >= n:
                if length == n:
                    self._free.pop(i)
                else:
                    self._free[i] = (start + n, length - n)
                return start
        return None
