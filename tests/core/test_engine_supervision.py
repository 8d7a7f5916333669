"""A dead engine thread fails everything pending at once and refuses new work (issue 14)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.engine import Engine
from core.engine.sampling import SampleRequest
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import FinetuneRequest
from difffit.errors import EngineDead


def _sample(i: int, steps: int = 1000) -> SampleRequest:
    return SampleRequest(f"s{i}", None, None, [0], i, steps, 2.0, "ddim", 8)


@pytest.fixture
def engine(tiny_base):
    engine = Engine(load_base(tiny_base), slots=2, max_classes=10, max_batch_size=2).start()
    yield engine
    engine.stop()


class DeviceLost(BaseException):
    """Stands for what the loop's own handlers do not catch (a device error, a bug)."""


def test_every_pending_future_fails_within_a_second_when_the_loop_dies(engine):
    diffusion = GaussianDiffusion.from_scheduler_config(engine.base.scheduler_config)
    data = TrainingData(torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,)), ["a", "b"])
    request = FinetuneRequest(dataset_url="x", adapter="a", steps=100_000, batch_size=8)
    run = engine.wait(engine.call(lambda: TrainingRun(engine.model, diffusion, data, request)), timeout=60)
    deaths: list[EngineDead] = []
    engine.on_death(deaths.append)
    entered, gate = threading.Event(), threading.Event()
    micro_step = run.micro_step

    def dying_micro_step() -> bool:
        if run.progress.step == 0:
            return micro_step()
        entered.set()  # the engine thread stops here, the rest queues up meanwhile
        gate.wait(30)
        raise DeviceLost("device lost")

    run.micro_step = dying_micro_step
    # max_batch_size 2: one-row requests with guidance -> one active, the others waiting
    samples = [engine.submit(_sample(i)) for i in range(3)]
    training = engine.submit_training(run)
    assert entered.wait(60)
    in_inbox = [engine.call(lambda: 1), engine.submit(_sample(7))]
    gate.set()
    started = time.monotonic()
    for future in [*samples, training, *in_inbox]:
        with pytest.raises(EngineDead, match="device lost"):
            future.result(timeout=5)
    assert time.monotonic() - started < 1.0
    assert not engine.alive and isinstance(engine.dead, EngineDead) and engine.dead.code == "engine-dead"
    assert deaths == [engine.dead]
    assert engine.stats()["engine_alive"] is False

    # later work fails at once, and a late death callback still runs
    with pytest.raises(EngineDead):
        engine.submit(_sample(9))
    with pytest.raises(EngineDead):
        engine.call(lambda: 1)
    late: list[EngineDead] = []
    engine.on_death(late.append)
    assert late == [engine.dead]


def test_the_fault_hook_kills_the_loop_and_wait_notices_it(engine):
    engine.inject_fault("gone")
    deadline = time.monotonic() + 10
    while engine.alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    from concurrent.futures import Future

    assert "gone" in engine.dead.message
    orphan: Future = Future()  # never resolved by anyone
    started = time.monotonic()
    with pytest.raises(EngineDead):
        engine.wait(orphan, timeout=30)
    assert time.monotonic() - started < 2.0


def test_a_clean_stop_is_not_a_death(engine):
    deaths: list[EngineDead] = []
    engine.on_death(deaths.append)
    assert engine.wait(engine.call(lambda: 42), timeout=30) == 42
    engine.stop()
    assert deaths == [] and engine.dead is None
