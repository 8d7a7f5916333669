"""The worker runtime sizes its adapter slots from memory and serves from the host tier."""

from __future__ import annotations

from difffit.settings import Settings
from worker.runtime import Runtime


def test_auto_slots_follow_the_cpu_budget(tiny_base, tmp_path):
    def built(mb: int) -> tuple[int, int]:
        settings = Settings(
            data_dir=tmp_path / str(mb), base_model=tiny_base, adapter_slots="auto", adapter_cpu_budget_mb=mb
        )
        rt = Runtime(settings)
        try:
            model = rt.engine.model
            assert rt.engine.stats()["slots"] == model.slots == rt.capacity.slots
            assert model.row_store.capacity == rt.capacity.table_rows
            allocated = model.vectors.nbytes + model.row_store.rows.nbytes
            base_rows = model.row_store.count[0] * model.row_store.rows[0].nbytes
            assert allocated - base_rows <= mb * 2**20  # the budget is the tier's size
            return model.slots, allocated
        finally:
            rt.engine.stop()

    (one, bytes1), (four, bytes4) = built(1), built(4)
    assert 3.9 <= four / one <= 4.1 and 3.9 <= bytes4 / bytes1 <= 4.1
