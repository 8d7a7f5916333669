"""Adapter capacity: slots sized by memory, the ragged class-row store, the host tier."""

from __future__ import annotations

import pytest
import torch

from core.adapter.store import PackedAdapter, RowStore
from core.engine.capacity import plan_capacity
from core.engine.host_tier import HostTier
from difffit.settings import Settings


def test_auto_slot_count_follows_the_budget():
    width, dim = 5000, 64
    per_slot = 4 * (width + 21 * dim)  # vector row + 21 class rows (budget_classes 20 + null)
    plans = {
        mb: plan_capacity(
            "auto",
            width=width,
            dim=dim,
            base_rows=11,
            max_classes=100,
            budget_classes=20,
            budget_bytes=mb * 2**20,
        )
        for mb in (1, 2, 8)
    }
    for mb, cap in plans.items():
        budget = mb * 2**20
        assert cap.slots == budget // per_slot and cap.budget_bytes == budget
        # the budget is spent whole: what is left after the vector rows goes to class rows
        assert budget - 4 * dim < cap.bytes(width, dim) - 4 * 11 * dim <= budget
    assert plans[8].slots // 8 == plans[1].slots and abs(plans[2].slots - 2 * plans[1].slots) <= 1
    fixed = plan_capacity(16, width=width, dim=dim, base_rows=11, max_classes=100, budget_classes=20)
    assert fixed.slots == 16 and fixed.table_rows == 11 + 15 * 21 and fixed.budget_bytes is None
    # the store always takes one adapter of max_classes next to the base
    assert (
        plan_capacity(2, width=width, dim=dim, base_rows=11, max_classes=500, budget_classes=20).table_rows
        == 512
    )


def test_adapter_slots_setting_takes_a_number_or_auto():
    assert Settings(adapter_slots="auto").adapter_slots == "auto"
    assert Settings(adapter_slots="5").adapter_slots == 5
    for bad in ("many", "1"):
        with pytest.raises(ValueError):
            Settings(adapter_slots=bad)


def test_row_store_reuses_gaps_and_compacts_without_moving_contents():
    store = RowStore(capacity=10, dim=2, slots=5, device="cpu")
    for s, n in [(1, 3), (2, 4), (3, 2)]:
        store.place(s, torch.full((n, 2), float(s)))
    store.release(2)  # a 4-row hole in the middle, 1 row free at the end
    store.place(2, torch.full((4, 2), 2.0))  # first fit: back into the hole, no compaction
    assert store.compactions == 0 and store.offset[2] == 3
    store.release(1)  # 3 rows free at the start, 1 at the end
    store.place(4, torch.full((4, 2), 4.0))  # fits only after compaction
    assert store.compactions == 1 and store.free_rows == 0
    for s, n in [(2, 4), (3, 2), (4, 4)]:
        rows = store.rows[store.offset[s] : store.offset[s] + n]
        assert store.count[s] == n and torch.equal(rows, torch.full((n, 2), float(s)))
        assert store.offsets_t[s].item() == store.offset[s]
    with pytest.raises(Exception, match="does not fit"):
        store.place(1, torch.zeros(1, 2))


def test_host_tier_keeps_the_most_recent_within_its_bytes():
    packed = PackedAdapter(torch.zeros(100), torch.zeros(4, 25), frozenset())  # 800 bytes
    tier = HostTier(capacity_bytes=3 * packed.nbytes)
    for k in range(4):
        tier.put(str(k), packed, {"k": k})
    assert "0" not in tier and all(str(k) in tier for k in (1, 2, 3))
    assert tier.get("1")[1] == {"k": 1}
    tier.put("4", packed, {})
    assert "2" not in tier and "1" in tier  # 1 was used last, 2 is the oldest
    loads = []
    item = tier.get_or_load("5", lambda: loads.append(1) or (packed, {"k": 5}))
    assert item[1] == {"k": 5} and tier.get_or_load("5", lambda: loads.append(1))[1] == {"k": 5}
    assert loads == [1]  # loaded once
