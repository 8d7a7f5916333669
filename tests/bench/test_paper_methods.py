"""The study's fine-tuning methods on a tiny random base: what trains, what it costs, sampling."""

from __future__ import annotations

import pytest
import torch

from base_models.tiny import make_tiny_base
from bench.paper.methods import METHODS, StudyBase, finetune
from bench.paper.sampling import balanced_labels, sample_images
from core.engine.training import TrainingData
from difffit.contract import Placement


@pytest.fixture(scope="module")
def study_base(tmp_path_factory) -> StudyBase:
    return StudyBase(str(make_tiny_base(tmp_path_factory.mktemp("paper_base"))))


@pytest.fixture(scope="module")
def data() -> TrainingData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    return TrainingData(x, torch.arange(40) % 4, ["a", "b", "c", "d"], retention=x[:8].flip(-1))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_samples(study_base, data, method):
    ft = finetune(study_base, data, method, steps=2, batch_size=8, seed=0)
    assert ft.train_seconds > 0 and torch.isfinite(torch.tensor(ft.final_loss))
    assert 0 < ft.trainable_params <= study_base.total_params
    assert ft.adapter_bytes > 4 * ft.trainable_params  # fp32 tensors + a safetensors header
    images = sample_images(ft.sampler, study_base.scheduler_config, balanced_labels(6, 4), ft.null_label,
                           slot=ft.slot, steps=2, size=8)  # fmt: skip
    assert images.shape == (6, 1, 8, 8) and images.abs().max() <= 1


def test_parameter_counts_follow_the_methods(study_base, data):
    counts = {m: finetune(study_base, data, m, 1, 4, 0).trainable_params for m in METHODS}
    # full: every weight, with the new 5-row class table in place of the base's 11 rows
    assert counts["full"] == study_base.total_params - (11 - 5) * 32
    assert counts["bitfit"] < counts["difffit"] == counts["diff_tuning"] < counts["full"]
    # LoRA: rank-8 A and B on 6 linears per block plus the new 5-row class table; no biases.
    hidden, ff, layers = 32, 128, 2
    per_block = 4 * 8 * (hidden + hidden) + 8 * (hidden + ff) + 8 * (ff + hidden)
    assert counts["lora"] == layers * per_block + 5 * hidden


def test_full_and_lora_start_from_the_same_class_table_as_trainingrun(study_base, data):
    """Same seed -> same new class table: the plain trainers draw it like TrainingRun."""
    ft = finetune(study_base, data, "lora", steps=1, batch_size=4, seed=7)
    table = ft.sampler.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    g = torch.Generator().manual_seed(7)
    fresh = study_base.model.init_adapter(Placement.bitfit(), 4, generator=g)
    # one AdamW step at lr 1e-3 moves each entry by at most ~1e-3
    assert torch.allclose(table, fresh["class_table"], atol=2e-3)
