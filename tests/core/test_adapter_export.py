"""Adapter file round trip and the merged diffusers export."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from core.adapter.file import adapter_metadata, load_adapter, save_adapter
from core.adapter.layers import Route
from core.adapter.merge import export_merged
from core.adapter.model import DiffFitDiT
from core.base_model import load_base
from difffit.contract import Placement
from difffit.errors import IncompatibleAdapter, InvalidRequest, TrainingFailed
from tests.conftest import random_adapter


def _meta(base, classes: int) -> dict:
    return adapter_metadata(
        base_model=base.model_id,
        base_hash=base.content_hash,
        method="difffit",
        placement=Placement().model_dump(),
        class_names=[f"c{i}" for i in range(classes)],
        resolution=8,
    )


def test_file_round_trip_and_base_hash_check(tiny_base):
    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    tensors = random_adapter(model, Placement(), 4)
    data = save_adapter(tensors, _meta(base, 4))
    loaded, meta = load_adapter(data, base_hash=base.content_hash)
    assert meta["num_classes"] == 4 and meta["base_hash"] == base.content_hash
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with pytest.raises(IncompatibleAdapter, match="content hash"):
        load_adapter(data, base_hash="0" * 64)
    with pytest.raises(InvalidRequest):
        load_adapter(b"not a safetensors file at all")


def test_save_refuses_what_would_not_load(tiny_base):
    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    tensors = random_adapter(model, Placement(), 4)
    with pytest.raises(ValueError, match="class_table has shape"):
        save_adapter(tensors, _meta(base, 5))  # 5 class names, a table of 4 + null
    nan = torch.full_like(tensors["proj_out_2.gamma"], float("nan"))
    diverged = dict(tensors, **{"proj_out_2.gamma": nan})
    with pytest.raises(TrainingFailed, match="'proj_out_2.gamma' holds NaN"):
        save_adapter(diverged, _meta(base, 4))


def test_base_hash_changes_with_the_weights(tiny_base, tmp_path):
    from base_models.tiny import make_tiny_base

    other = make_tiny_base(tmp_path / "other", seed=1)
    assert load_base(tiny_base).content_hash != load_base(str(other)).content_hash
    assert load_base(tiny_base).content_hash == load_base(tiny_base).content_hash


@torch.no_grad()
def test_applied_adapter_equals_merged_export_in_plain_diffusers(tiny_base, tmp_path):
    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    tensors = random_adapter(model, Placement(qkv="all", branches="all", final_layer=True), 6, seed=3)
    model.load_slot(1, tensors)
    out = export_merged(tiny_base, tensors, _meta(base, 6), tmp_path / "merged")
    plain = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer").eval()
    assert plain.config.num_embeds_ada_norm == 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 300, 700, 999])
    y = torch.tensor([0, 2, 5, 6, 6])  # 6 = null row
    expected = plain(x, timestep=t, class_labels=y).sample
    got = model(x, t, y, Route.single(1))
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - model(x, t, y, Route.single(0)).abs()).abs().max() > 1e-3


@torch.no_grad()
def test_extract_from_a_fine_tuned_diffusers_model_inverts_the_merge(tiny_base, tmp_path):
    from core.adapter.extract import extract_adapter

    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    placement = Placement()
    tensors = random_adapter(model, placement, 4, seed=5)
    out = export_merged(tiny_base, tensors, _meta(base, 4), tmp_path / "merged")
    tuned = DiTTransformer2DModel.from_pretrained(out, subfolder="transformer")
    extracted = extract_adapter(model, tuned, placement)
    assert extracted.keys() == tensors.keys()
    assert max((extracted[k] - tensors[k]).abs().max().item() for k in tensors) <= 1e-4

    # A weight change that is not a row scale is not an adapter.
    tuned.transformer_blocks[0].attn1.to_q.weight[0, 0] += 1.0
    with pytest.raises(IncompatibleAdapter, match="to_q.weight differs"):
        extract_adapter(model, tuned, placement)
    # ... and gamma where the placement has none is refused too.
    with pytest.raises(IncompatibleAdapter, match="row scale"):
        extract_adapter(
            model, DiTTransformer2DModel.from_pretrained(out, subfolder="transformer"), Placement.bitfit()
        )
