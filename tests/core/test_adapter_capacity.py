"""Ragged class tables in the engine: mixed class counts, eviction under pressure."""

from __future__ import annotations

import torch

from core.adapter.layers import Route
from core.adapter.model import DiffFitDiT
from core.base_model import load_base
from core.engine.engine import Engine
from core.engine.sampling import SampleRequest
from difffit.contract import Placement
from tests.conftest import random_adapter


@torch.no_grad()
def test_10_and_1000_class_adapters_side_by_side_equal_each_alone(tiny_base):
    base = load_base(tiny_base)
    # 1012 rows: the base (11) + 11 + 1001 + nothing spare, each adapter exactly its size
    model = DiffFitDiT(base.transformer, slots=3, max_classes=1000, table_rows=11 + 11 + 1001)
    small, large = (
        random_adapter(model, Placement(), 10, seed=1),
        random_adapter(model, Placement.bitfit(), 1000, seed=2),
    )
    model.load_slot(1, small)
    model.load_slot(2, large)
    assert model.row_store.free_rows == 0  # a slot costs what its adapter holds
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)
    y = torch.tensor([0, 9, 10, 999, 1000, 512])  # 10 and 1000: the null rows
    mixed = model(x, t, y, Route.mixed([1, 1, 1, 2, 2, 2]))
    alone1 = model(x[:3], t[:3], y[:3], Route.single(1))
    alone2 = model(x[3:], t[3:], y[3:], Route.single(2))
    assert (mixed[:3] - alone1).abs().max() <= 1e-4
    assert (mixed[3:] - alone2).abs().max() <= 1e-4
    assert (alone2 - model(x[3:], t[3:], torch.tensor([9, 10, 5]), Route.single(1))).abs().max() > 1e-3


def _requests(tensors: dict[str, dict], rounds: int) -> list[SampleRequest]:
    out = []
    for i in range(rounds):
        for j, (key, t) in enumerate(tensors.items()):
            classes = t["class_table"].shape[0] - 1
            labels = [(i + j) % classes, (3 * i + j) % classes]
            out.append(SampleRequest(f"r{i}-{j}", key, t, labels, 10 * i + j, 3, 2.0, "ddim", 8, True))
    return out


def test_eviction_under_pressure_serves_the_same_images(tiny_base):
    """8 adapters of 2..40 classes through 2 slots and a 60-row store vs a bank that holds all.

    Evictions, row compaction and reuse of slots while other requests run must
    give each request exactly the images it gets with no eviction at all.
    """
    base = load_base(tiny_base)
    probe = DiffFitDiT(load_base(tiny_base).transformer, slots=2, max_classes=40)
    sizes = [40, 2, 17, 5, 33, 9, 3, 25]
    tensors = {f"{k:064x}": random_adapter(probe, Placement(), n, seed=k) for k, n in enumerate(sizes)}

    def run(engine: Engine) -> list[torch.Tensor]:
        try:
            futures = [engine.submit(r) for r in _requests(tensors, rounds=3)]
            return [f.result(timeout=300) for f in futures]
        finally:
            engine.stop()

    roomy = Engine(base, slots=9, max_classes=40, max_batch_size=64).start()
    expected = run(roomy)
    assert roomy.stats()["evictions"] == 0

    tight = Engine(
        load_base(tiny_base), slots=3, max_classes=40, max_batch_size=64, table_rows=11 + 60
    ).start()
    got = run(tight)
    stats = tight.stats()
    # 8 adapters through 2 slots: at least 8 loads, 6 of them into an evicted slot
    assert stats["misses"] >= 8 and stats["evictions"] >= 6
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        # Batches differ between the runs, so fp32 sums run in another order: allow 1e-6 of the
        # latents' size on top of 1e-4 (as tests/core/test_engine_sampling.py does). A stale or
        # half-copied slot (another adapter's rows) differs by O(1).
        tol = 1e-4 + 1e-6 * a.abs().max().item()
        assert a.shape == b.shape and (a - b).abs().max().item() <= tol, f"request {i}"
