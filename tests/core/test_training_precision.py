"""Issue 13 on the training side: fp32 masters on a bf16 base, micro-batches, resume, EMA warm-up."""

from __future__ import annotations

import pytest
import torch

from core.adapter.layers import Route
from core.adapter.model import DiffFitDiT
from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.training import EMA_DECAY, TrainingData, TrainingRun
from difffit.contract import FinetuneRequest
from difffit.errors import UnsupportedPrecision


def _setup(tiny_base, dtype=torch.float32, n=24, classes=3):
    base = load_base(tiny_base, dtype=dtype)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
    g = torch.Generator().manual_seed(0)
    data = TrainingData(
        torch.randn(n, 1, 8, 8, generator=g),
        torch.randint(0, classes, (n,), generator=g),
        list("abc")[:classes],
    )
    return model, diffusion, data


def _request(**kw) -> FinetuneRequest:
    return FinetuneRequest(**{"dataset_url": "x", "adapter": "a", "steps": 3, "batch_size": 8, **kw})


def _run_steps(run: TrainingRun, n: int) -> None:
    for _ in range(n):
        while not run.micro_step():
            pass


def _gammas(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.params.items() if k.endswith(".gamma")}


def test_bf16_fine_tune_moves_gammas_below_a_bf16_step_and_still_changes_the_output(tiny_base):
    model, diffusion, data = _setup(tiny_base, dtype=torch.bfloat16)
    run = TrainingRun(model, diffusion, data, _request(steps=3))
    _run_steps(run, 3)
    assert all(v.dtype == torch.float32 for v in run.params.values())  # fp32 masters
    moved = torch.cat([(g - 1).abs().flatten() for g in _gammas(run).values()])
    assert 0 < moved.max() < 2**-8  # in bf16 every one of these would round to exactly 1.0
    assert (moved > 0).float().mean() > 0.9
    # The gammas' effect alone: the trained adapter vs the same adapter with gamma = 1, on the bf16 base.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g).to(torch.bfloat16)
    t, y = torch.tensor([10, 300, 600, 900]), torch.tensor([0, 1, 2, 3])
    trained = {k: v.detach() for k, v in run.params.items()}
    ones = {k: (torch.ones_like(v) if k.endswith(".gamma") else v) for k, v in trained.items()}
    with torch.no_grad():
        with_gamma = model(x, t, y, Route.training(trained)).float()
        without = model(x, t, y, Route.training(ones)).float()
    assert with_gamma.dtype == torch.float32 and (with_gamma - without).abs().max() > 0


def test_fp16_training_is_refused_with_a_typed_error(tiny_base):
    model, diffusion, data = _setup(tiny_base, dtype=torch.float16)
    with pytest.raises(UnsupportedPrecision, match="bfloat16"):
        TrainingRun(model, diffusion, data, _request())


def _assert_same_step(a: TrainingRun, b: TrainingRun) -> None:
    """Same gradients (<= 1e-5) and the same adapter after the step.

    The keys' biases are left out of the adapter comparison: softmax is
    shift-invariant, so their true gradient is 0 and what autograd returns is
    rounding noise (< 1e-8 here), which Adam rescales into steps of size lr.
    """
    for k, v in a.params.items():
        assert torch.allclose(b.params[k].grad, v.grad, atol=1e-5, rtol=0), k
        if k.endswith("to_k.bias"):
            assert v.grad.abs().max() < 1e-6
        else:
            assert torch.allclose(b.params[k], v, atol=1e-5, rtol=0), k


def test_micro_batched_step_equals_the_unsplit_step(tiny_base):
    model, diffusion, data = _setup(tiny_base)
    whole = TrainingRun(model, diffusion, data, _request(batch_size=8))
    split = TrainingRun(model, diffusion, data, _request(batch_size=8), microbatch=3)
    fresh = {k: v.detach().clone() for k, v in whole.params.items()}
    _run_steps(whole, 1)
    assert split.micro_step() is False and split.micro_step() is False  # 3 + 3 of 8 rows
    assert split.progress.step == 0
    assert split.micro_step() is True and split.progress.step == 1  # the last 2 rows: one optimizer step
    _assert_same_step(whole, split)
    _run_steps(whole, 1)
    _run_steps(split, 1)
    _assert_same_step(whole, split)
    assert split.progress.losses == pytest.approx(whole.progress.losses, abs=1e-5)
    moved = max((v - fresh[k]).abs().max() for k, v in whole.params.items())
    assert moved > 1e-4  # the steps did something the comparison can see


def test_diff_tuning_micro_batches_keep_the_loss_weights(tiny_base):
    model, diffusion, data = _setup(tiny_base)
    data.retention = torch.randn(10, 1, 8, 8)
    req = _request(batch_size=10, objective="diff_tuning")
    whole, split = (
        TrainingRun(model, diffusion, data, req),
        TrainingRun(model, diffusion, data, req, microbatch=4),
    )
    for _ in range(2):
        _run_steps(whole, 1)
        _run_steps(split, 1)
        _assert_same_step(whole, split)


def test_resume_after_a_micro_batched_step_is_unchanged(tiny_base):
    model, diffusion, data = _setup(tiny_base)
    req = _request(batch_size=8, ema=True)
    straight = TrainingRun(model, diffusion, data, req, microbatch=3)
    _run_steps(straight, 3)
    first = TrainingRun(model, diffusion, data, req, microbatch=3)
    _run_steps(first, 1)
    state = first.state_dict()
    assert state["step"] == 1
    resumed = TrainingRun(model, diffusion, data, req, init=state, microbatch=3)
    _run_steps(resumed, 2)
    assert resumed.progress.step == 3 and resumed.progress.losses == straight.progress.losses
    for k, v in straight.result().items():
        assert torch.equal(resumed.result()[k], v), k


def test_ema_warms_up_then_decays_at_0_999(tiny_base):
    model, diffusion, data = _setup(tiny_base)
    run = TrainingRun(model, diffusion, data, _request(ema=True, steps=3))
    expected = {k: v.detach().clone() for k, v in run.params.items()}
    for n in (1, 2, 3):
        _run_steps(run, 1)
        decay = min(EMA_DECAY, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13
        for k, v in run.params.items():
            expected[k] = decay * expected[k] + (1 - decay) * v.detach()
    for k, v in expected.items():
        assert torch.allclose(run.ema[k], v, atol=1e-6, rtol=0), k
    # Far along, the decay is capped at 0.999: (1 + n) / (10 + n) passes it at n = 8991.
    run = TrainingRun(model, diffusion, data, _request(ema=True, steps=20_000))
    run.progress.step = 10_000
    before = {k: v.clone() for k, v in run.ema.items()}
    _run_steps(run, 1)
    for k, v in run.params.items():
        assert torch.allclose(run.ema[k], 0.999 * before[k] + 0.001 * v.detach(), atol=1e-6, rtol=0), k
