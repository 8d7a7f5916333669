"""DiffFitDiT against untouched diffusers: identity, slots, mixing, tying, counts."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from core.adapter.layers import Route
from core.adapter.model import DiffFitDiT, count_params
from core.adapter.placement import gamma_layers
from core.params import count_for_shape
from difffit.contract import Placement
from difffit.errors import IncompatibleAdapter
from tests.conftest import random_adapter


def _load(path: str) -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_pretrained(path, subfolder="transformer").eval()


def _inputs(b: int = 4, c: int = 1, s: int = 8, classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, s, s, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.randint(0, classes + 1, (b,), generator=g)  # includes the null row
    return x, t, y


@torch.no_grad()
def test_identity_adapter_equals_untouched_diffusers(tiny_base):
    plain = _load(tiny_base)
    model = DiffFitDiT(_load(tiny_base), slots=3, max_classes=10)
    model.load_slot(1, model.base_adapter())  # the identity adapter, in a slot of its own
    x, t, y = _inputs()
    expected = plain(x, timestep=t, class_labels=y).sample
    for route in (Route.single(0), Route.single(1), Route.mixed([0, 1, 0, 1])):
        got = model(x, t, y, route)
        assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_mixed_batch_rows_equal_single_slot_forwards(tiny_base):
    model = DiffFitDiT(_load(tiny_base), slots=4, max_classes=10)
    model.load_slot(1, random_adapter(model, Placement(), 5, seed=1))
    model.load_slot(2, random_adapter(model, Placement.bitfit(), 7, seed=2))
    x, t, _ = _inputs(6)
    y = torch.tensor([1, 3, 5, 0, 4, 7])  # 5 and 7: the null rows of slots 1 and 2
    slots = [1, 1, 1, 2, 2, 2]
    mixed = model(x, t, y, Route.mixed(slots))
    alone1 = model(x[:3], t[:3], y[:3], Route.single(1))
    alone2 = model(x[3:], t[3:], y[3:], Route.single(2))
    assert (mixed[:3] - alone1).abs().max() <= 1e-5
    assert (mixed[3:] - alone2).abs().max() <= 1e-5
    assert (alone1 - model(x[:3], t[:3], y[:3], Route.single(0))).abs().max() > 1e-3


def test_tying_refuses_embedders_that_are_not_copies(tiny_base):
    transformer = _load(tiny_base)
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb"):
        DiffFitDiT(transformer)


def test_tying_removes_the_copies(tiny_base):
    plain = _load(tiny_base)
    model = DiffFitDiT(_load(tiny_base))
    per_block = sum(p.numel() for p in plain.transformer_blocks[1].norm1.emb.parameters())
    untied = sum(p.numel() for p in plain.parameters())
    weights = sum(p.numel() for p in model.parameters())
    biases = sum(m.bias_bank.shape[1] for m in model.layers.values())
    table = model.class_table.table(0).numel()
    assert weights + biases + table == untied - per_block * (len(plain.transformer_blocks) - 1)


def test_incompatible_adapters_are_refused(tiny_base):
    model = DiffFitDiT(_load(tiny_base), slots=2, max_classes=10)
    good = random_adapter(model, Placement(), 5)
    bad_shape = dict(good, **{"proj_out_2.bias": torch.zeros(3)})
    with pytest.raises(IncompatibleAdapter, match="proj_out_2.bias has shape"):
        model.load_slot(1, bad_shape)
    unknown = dict(good, **{"transformer_blocks.9.attn1.to_q.bias": torch.zeros(32)})
    with pytest.raises(IncompatibleAdapter, match="matches no layer"):
        model.load_slot(1, unknown)
    too_many = dict(good, class_table=torch.zeros(50, model.hidden_size))
    with pytest.raises(IncompatibleAdapter, match="at most 10"):
        model.load_slot(1, too_many)


def test_placement_counts_and_breakdown(tiny_base):
    model = DiffFitDiT(_load(tiny_base))
    assert gamma_layers(Placement.bitfit(), 2) == []
    paper = gamma_layers(Placement(), 2)
    assert "transformer_blocks.0.attn1.to_q" in paper  # qkv in the first half only
    assert "transformer_blocks.1.attn1.to_q" not in paper
    assert "transformer_blocks.1.ff.net.2" not in paper  # branches in the first half only
    assert "transformer_blocks.0.ff.net.2" in paper and "proj_out_2" in paper
    counts = count_params(model.init_adapter(Placement(), 5))
    assert counts["class_table"] == 6 * model.hidden_size
    assert counts["total"] == counts["biases"] + counts["gammas"] + counts["class_table"]


def test_difffit_params_on_dit_xl2_match_the_paper():
    bitfit = count_for_shape("DiT-XL/2", 101, "bitfit")
    difffit = count_for_shape("DiT-XL/2", 101, "difffit")
    assert abs(bitfit["trainable"]["total"] - 0.61e6) / 0.61e6 <= 0.005  # paper Table 1: 0.61M
    assert bitfit["trainable"]["gammas"] == 0
    assert difffit["trainable"]["biases"] == bitfit["trainable"]["biases"] == 489_632
    assert difffit["trainable"]["class_table"] == 102 * 1152
    # The final placement: q, k, v, attention out and MLP out of blocks 0..13, 32 on the final layer.
    assert difffit["trainable"]["gammas"] == 14 * 5 * 1152 + 32 == 80_672
    assert difffit["trainable"]["total"] == 687_808
    # Counted as the reference code counts: its 96,768 gammas (14 blocks x 6H) plus the final layer's 32.
    assert difffit["trainable_reference_count"]["gammas"] == 96_768 + 32
    assert difffit["trainable_reference_count"]["total"] == 703_936
    assert difffit["diffusers_params"] == 749_826_464  # per-block copies, as diffusers stores it
    assert abs(difffit["model_params"] - 673.8e6) < 0.2e6  # paper: 673.8M


def test_table_4b_slope_is_two_branch_gammas_per_block():
    """Table 4b moves the residual-branch gammas over the blocks: 1->14 0.770M, 1->28 0.803M."""
    half = count_for_shape("DiT-XL/2", 101, placement=Placement(qkv="all", branches="first_half"))
    full = count_for_shape("DiT-XL/2", 101, placement=Placement(qkv="all", branches="all"))
    added = full["trainable"]["total"] - half["trainable"]["total"]
    assert added == 14 * 2 * 1152 and abs(added - (0.803e6 - 0.770e6)) <= 1e3


def test_difffit_params_cli_prints_the_default_placement_counts(capsys):
    from launch.cli import main

    assert main(["params", "--shape", "DiT-XL/2", "--classes", "101"]) == 0
    out = capsys.readouterr().out
    assert "'qkv': 'first_half', 'branches': 'first_half', 'final_layer': True" in out
    # The paper's placement counted as the paper (and its reference code) counts: 96,768 + 32 gammas.
    assert "trainable, paper's count   :       703,936  (0.704M" in out
    assert "96,800  (each gamma its own vector)" in out
    assert "stored in the adapter file :       687,808  (0.688M, 80,672 gammas" in out
