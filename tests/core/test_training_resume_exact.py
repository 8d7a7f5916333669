"""A run resumed from a checkpoint ends with the same adapter as the run uninterrupted (issue 14).

CPU fp32, same seed: bit-identical, every tensor. The checkpoint is serialised
only after the original run stepped on, as the worker's task thread does while
the engine keeps training: a snapshot that aliased live optimizer state (it
used to) would resume with later moments and drift.
"""

from __future__ import annotations

import pytest
import torch

from core.adapter.model import DiffFitDiT
from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import FinetuneRequest
from worker.finetune_job import torch_bytes, torch_load_bytes

STEPS, AT = 6, 3


@pytest.fixture(scope="module")
def setup(tiny_base):
    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
    g = torch.Generator().manual_seed(0)
    data = TrainingData(
        torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g), list("abc")
    )
    return model, diffusion, data


def _run(setup, request, microbatch, init=None, every=0) -> TrainingRun:
    model, diffusion, data = setup
    return TrainingRun(model, diffusion, data, request, init, every, microbatch=microbatch)


def _tensors(state) -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) state dict, by path."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)

    walk("", state)
    return out


@pytest.mark.parametrize(("microbatch", "ema"), [(0, False), (2, True), (3, False)])
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(setup, microbatch, ema):
    request = FinetuneRequest(dataset_url="x", adapter="a", steps=STEPS, batch_size=8, seed=7, ema=ema)
    straight = _run(setup, request, microbatch)
    while not straight.step():
        pass

    interrupted = _run(setup, request, microbatch, every=AT)
    while interrupted.progress.step < AT:
        interrupted.step()
    assert interrupted.checkpoint_ready.is_set() and interrupted.checkpoint["step"] == AT
    snapshot = interrupted.checkpoint
    interrupted.step()  # the engine steps on before the task thread writes the checkpoint
    blob = torch_bytes(snapshot)

    resumed = _run(setup, request, microbatch, init=torch_load_bytes(blob))
    assert resumed.progress.step == AT and len(resumed.progress.losses) == AT
    while not resumed.step():
        pass

    assert resumed.progress.losses == straight.progress.losses
    final, expected = resumed.result(), straight.result()
    assert final.keys() == expected.keys()
    for k in expected:
        assert torch.equal(final[k], expected[k]), k
    # the whole resumable state agrees too: params, EMA, moments, step counters, RNG
    got, want = _tensors(resumed.state_dict()), _tensors(straight.state_dict())
    assert got.keys() == want.keys() and any("exp_avg_sq" in k for k in want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_the_snapshot_does_not_move_with_the_live_run(setup):
    request = FinetuneRequest(dataset_url="x", adapter="a", steps=STEPS, batch_size=8, seed=1, ema=True)
    run = _run(setup, request, 0, every=2)
    run.step()
    run.step()
    snapshot = run.checkpoint
    frozen = {k: v.clone() for k, v in _tensors(snapshot).items()}
    run.step()
    run.step()
    assert all(torch.equal(_tensors(snapshot)[k], v) for k, v in frozen.items())
    assert any(not torch.equal(_tensors(run.state_dict())[k], v) for k, v in frozen.items() if "exp_avg" in k)
