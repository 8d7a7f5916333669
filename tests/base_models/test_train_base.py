"""base_models/train_base.py on a fake Fashion-MNIST: export, warm start, resume.

The committed base is made by this script; these runs use a 1-block model and
a few synthetic IDX images so they take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

from base_models.train_base import load_fmnist, parse_args, train
from core.adapter.model import DiffFitDiT
from tests.idx import write_idx


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (64, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(64) % 10)
    return folder


def _args(data: Path, out: Path, state: Path, *extra: str) -> list[str]:
    tiny = ["--layers", "1", "--heads", "1", "--head-dim", "8", "--batch-size", "8", "--threads", "1"]
    short = ["--warmup", "1", "--export-every", "2", "--log-every", "1", "--time-limit-min", "0"]
    return ["--data-dir", str(data), "--out", str(out), "--state", str(state), *tiny, *short, *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return DiTTransformer2DModel.from_pretrained(folder / "transformer").state_dict()


def test_load_fmnist_pads_to_32_and_scales(fake_fmnist: Path) -> None:
    x, y = load_fmnist(str(fake_fmnist))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.all(x[:, :, :2, :] == -1)  # the zero (background) padding


def test_export_is_a_diffusers_folder_the_engine_loads(fake_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "base"
    train(parse_args(_args(fake_fmnist, out, tmp_path / "s.pt", "--steps", "2")))
    info = json.loads((out / "training.json").read_text())
    assert info["steps_done"] == 2 and info["status"] == "complete"
    assert json.loads((out / "labels.json").read_text())[9] == "Ankle boot"
    transformer = DiTTransformer2DModel.from_pretrained(out / "transformer")
    DiffFitDiT(transformer, slots=1)  # checks the per-block embedder copies are equal, ties them


def test_resume_continues_and_the_ema_moves(fake_fmnist: Path, tmp_path: Path) -> None:
    out, state = tmp_path / "base", tmp_path / "s.pt"
    train(parse_args(_args(fake_fmnist, out, state, "--steps", "2")))
    before = _weights(out)
    train(parse_args(_args(fake_fmnist, out, state, "--steps", "4", "--resume")))
    info = json.loads((out / "training.json").read_text())
    assert info["steps_done"] == 4
    assert [p["until_step"] for p in info["earlier_phases"]] == [2]
    after = _weights(out)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "proj_out_2.weight" in moved, "the resumed run's EMA export did not change"


def test_init_from_starts_at_the_exported_weights(fake_fmnist: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    train(parse_args(_args(fake_fmnist, first, tmp_path / "a.pt", "--steps", "2")))
    # lr 0: the warm-started model must export exactly the weights it started from
    train(parse_args(_args(fake_fmnist, second, tmp_path / "b.pt", "--steps", "1", "--lr", "0",
                           "--init-from", str(first))))  # fmt: skip
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((second / "training.json").read_text())
    assert info["steps_before"] == 2 and info["earlier_phases"][-1]["until_step"] == 2


def test_init_from_refuses_untied_copies(fake_fmnist: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(parse_args(_args(fake_fmnist, first, tmp_path / "a.pt", "--steps", "1")))
    model = DiTTransformer2DModel.from_pretrained(first / "transformer")
    if len(model.transformer_blocks) < 2:
        model = DiTTransformer2DModel.from_config({**model.config, "num_layers": 2})
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    model.save_pretrained(first / "transformer")
    with pytest.raises(ValueError, match="differs from block 0"):
        train(parse_args(_args(fake_fmnist, tmp_path / "x", tmp_path / "b.pt", "--steps", "1",
                               "--layers", "2", "--init-from", str(first))))  # fmt: skip
