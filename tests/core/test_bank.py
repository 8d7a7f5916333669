"""SlotBank: LRU slots keyed by content hash; pinned slots are never evicted or leaked."""

from __future__ import annotations

from core.adapter.model import DiffFitDiT
from core.base_model import load_base
from core.engine.bank import SlotBank
from difffit.contract import Placement
from tests.conftest import random_adapter


def _bank(tiny_base, slots: int = 3) -> tuple[SlotBank, dict]:
    model = DiffFitDiT(load_base(tiny_base).transformer, slots=slots, max_classes=10)
    adapters = {k: random_adapter(model, Placement(), 3, seed=i) for i, k in enumerate("abcd")}
    return SlotBank(model), adapters


def test_a_slot_forgotten_while_pinned_is_freed_by_its_last_release(tiny_base):
    bank, adapters = _bank(tiny_base)  # slots 1 and 2 for adapters
    slot = bank.acquire("a", adapters["a"])
    assert bank.acquire("a", None) == slot  # pinned twice
    bank.forget("a")
    assert not bank.resident("a")
    other = bank.acquire("b", adapters["b"])
    assert other != slot
    # Every slot is pinned now ("a"'s by its two requests): nothing to give out.
    assert bank.acquire("c", adapters["c"]) is None
    bank.release(slot)
    assert bank.acquire("c", adapters["c"]) is None  # still one pin on the forgotten slot
    bank.release(slot)
    assert bank.acquire("c", adapters["c"]) == slot  # freed by its last release, not leaked
    assert bank.resident("c") and not bank.resident("a")


def test_forget_of_an_unpinned_slot_frees_it_at_once_and_pins_block_eviction(tiny_base):
    bank, adapters = _bank(tiny_base)
    a = bank.acquire("a", adapters["a"])
    bank.release(a)
    bank.forget("a")
    bank.forget("never-loaded")  # a no-op
    assert bank.acquire("b", adapters["b"]) == a  # the freed slot, no eviction
    c = bank.acquire("c", adapters["c"])
    assert bank.acquire("d", adapters["d"]) is None  # both pinned: no eviction
    bank.release(a)
    assert bank.acquire("d", adapters["d"]) == a  # evicts the unpinned LRU entry "b"
    assert bank.stats()["evictions"] == 1 and not bank.resident("b")
    assert c != a
