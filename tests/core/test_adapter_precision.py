"""A bf16 base still carries the adapter's effect: fp32 tables, fp32 affine, one cast."""

from __future__ import annotations

import torch

from base_models.tiny import tiny_transformer
from core.adapter.layers import Route
from core.adapter.model import DiffFitDiT

LAYER = "proj_out_2"


def _model(dtype: torch.dtype) -> DiffFitDiT:
    # Weights rounded to bf16 once, so both models hold the same values.
    tr = tiny_transformer(in_channels=4, sample_size=32, num_layers=2, heads=2, head_dim=32, seed=0)
    return DiffFitDiT(tr.to(torch.bfloat16).to(dtype), slots=2, max_classes=10)


@torch.no_grad()
def _effect(model: DiffFitDiT, x, t, y) -> torch.Tensor:
    """Per-channel shift and scale components of (adapted - base) at LAYER's output, [2 * out]."""
    seen = {}
    hook = model.transformer.get_submodule(LAYER).register_forward_hook(
        lambda m, i, o: seen.__setitem__("out", o.float())
    )
    try:
        model(x, t, y, Route.single(0))
        base = seen["out"]  # [B, T, out]
        model(x, t, y, Route.single(1))
        diff = seen["out"] - base
    finally:
        hook.remove()
    shift = diff.mean((0, 1))
    scale = (diff * base).mean((0, 1)) / base.pow(2).mean((0, 1)).sqrt()
    return torch.cat([shift, scale])


def test_bf16_base_keeps_the_effect_of_gammas_near_one():
    """Adapted minus base output of a bf16 model matches the fp32 reference within 2%.

    Measurement point: the output of one adapted layer (the final ``proj_out_2``)
    of a small DiT, with an adapter that equals the base everywhere else, so the
    layer's input is the same under both routes and the difference is the
    adapter's effect alone. Gammas are 1 +- 0.005, bias changes +- 0.005.

    A bf16 output rounds each element to 2^-8 of its size, so no bf16 tensor
    holds a 0.2% change element by element; what the next layers see (they sum
    over many elements) is the systematic part. The test compares that part:
    per channel, the mean of the difference (shift) and its projection on the
    base output (scale), over 32 x 256 tokens, where rounding noise averages to
    ~0.5% while a lost gamma or bias (bf16 tables, or ``W x`` rounded to bf16
    before the affine so every token rounds the same way) is a 10-100% error.
    """
    g = torch.Generator().manual_seed(0)
    fp32, bf16 = _model(torch.float32), _model(torch.bfloat16)
    adapter = {k: v.float().clone() for k, v in fp32.base_adapter().items()}
    bias = adapter[f"{LAYER}.bias"]
    adapter[f"{LAYER}.bias"] = bias + (torch.rand(bias.shape, generator=g) * 2 - 1) * 0.005
    adapter[f"{LAYER}.gamma"] = 1 + (torch.rand(bias.shape, generator=g) * 2 - 1) * 0.005
    fp32.load_slot(1, adapter)
    bf16.load_slot(1, adapter)

    x = torch.randn(32, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    reference = _effect(fp32, x, t, y)
    got = _effect(bf16, x.bfloat16(), t, y)
    assert reference.norm() > 1e-3  # the effect is there to be kept
    rel = ((got - reference).norm() / reference.norm()).item()
    assert rel <= 0.02, f"bf16 effect off by {100 * rel:.1f}% of the fp32 reference"
    # the tables themselves are fp32: gamma 1.002 is not 1.0 in the bank
    assert bf16.vectors.dtype == torch.float32 and bf16.row_store.rows.dtype == torch.float32
