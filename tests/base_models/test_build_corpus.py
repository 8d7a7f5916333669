"""base_models/build_corpus.py on two fonts and a fake Fashion-MNIST, then train_base.py and gate.py on it.

A few classes and renders, so it takes seconds; the full corpus is the same code with more of both.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiTTransformer2DModel

from base_models.build_corpus import build, parse_args, stroke_width
from base_models.corpus import load_corpus, subset_indices
from base_models.glyph_classes import EXCLUDED, candidates
from tests.base_models.conftest import FILES, build_tiny


def test_candidates_hold_no_digit_and_no_look_alike() -> None:
    chars = candidates()
    assert len(chars) > 150
    assert not any(unicodedata.category(c) in ("Nd", "Nl", "No") for c in chars)
    for look_alike in "0123456789OoIl|ЗзбЧчgqΟο":  # noqa: RUF001 (Cyrillic and Greek on purpose)
        assert look_alike not in chars
    assert not set(chars) & set(EXCLUDED)
    assert len(set(chars)) == len(chars)


def test_same_command_same_bytes(corpus: Path, fonts: Path, fake_fashion: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_tiny(fonts, fake_fashion, again)
    for name in FILES:
        assert (corpus / name).read_bytes() == (again / name).read_bytes(), name
    other_seed = tmp_path / "other"
    build(
        parse_args(
            ["--font-dir", str(fonts), "--fashion-dir", str(fake_fashion), "--out", str(other_seed)]
            + ["--min-families", "2", "--max-classes", "5", "--per-class", "6", "--heldout-per-class", "2"]
        )
    )
    assert (corpus / FILES[0]).read_bytes() != (other_seed / FILES[0]).read_bytes()  # the seed matters


def test_shapes_classes_and_renders(corpus: Path) -> None:
    names = json.loads((corpus / "labels.json").read_text())
    info = json.loads((corpus / "corpus.json").read_text())
    assert len(names) == 5 + 10 and names[0].startswith("A ") and names[-1] == "fashion: Ankle boot"
    assert info["flip_classes"] == list(range(5, 15))
    x, y = np.load(corpus / "train_images.npy"), np.load(corpus / "train_labels.npy")
    assert x.shape == (15 * 6, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int16
    assert np.bincount(y, minlength=15).tolist() == [6] * 15
    hx, hy = np.load(corpus / "heldout_images.npy"), np.load(corpus / "heldout_labels.npy")
    assert hx.shape == (30, 32, 32) and np.bincount(hy).tolist() == [2] * 15
    glyphs = x[y < 5]
    assert (glyphs.reshape(len(glyphs), -1).max(1) > 200).all()  # every render has ink
    mass = glyphs.astype(np.float64).sum((0, 1))  # column profile of all glyph ink: centred
    assert abs(float((mass * np.arange(32)).sum() / mass.sum()) - 15.5) < 2.0
    assert not any(unicodedata.category(n[0]).startswith("N") for n in names[:5])


def test_strokes_are_widened_towards_mnist_pens() -> None:
    from base_models.build_corpus import set_stroke

    thin = np.zeros((80, 80), np.float32)
    thin[10:70, 39:41] = 1.0  # a 2 px bar at 4x scale, 0.5 px at 32 px
    assert stroke_width(thin) == pytest.approx(2.0, rel=0.1)
    assert stroke_width(set_stroke(thin, 10.0)) == pytest.approx(10.0, rel=0.25)


def test_load_corpus_subsets_and_names(corpus: Path) -> None:
    full = load_corpus(corpus, "train")
    assert full.images.shape == (90, 1, 32, 32) and float(full.images.min()) >= -1
    assert full.flippable.tolist() == [False] * 5 + [True] * 10
    assert subset_indices(15, 3) == [0, 5, 10]
    part = load_corpus(corpus, "train", class_subset=3)
    assert part.names == [full.names[i] for i in (0, 5, 10)]
    assert sorted(set(part.labels.tolist())) == [0, 1, 2]
    named = load_corpus(corpus, "heldout", names=[full.names[7], full.names[1]])
    assert named.names == [full.names[7], full.names[1]]
    assert named.labels.tolist() == [1, 1, 0, 0]  # file order (class 1 first), relabelled by ``names``
    with pytest.raises(ValueError, match="not in this corpus"):
        load_corpus(corpus, "train", names=["nope"])


def test_train_on_corpus_then_gate(corpus: Path, tmp_path: Path) -> None:
    from base_models.gate import parse_args as gate_args
    from base_models.gate import run_gate
    from base_models.train_base import parse_args as train_args
    from base_models.train_base import train

    out = tmp_path / "base"
    tiny = ["--layers", "1", "--heads", "1", "--head-dim", "8", "--batch-size", "8", "--threads", "1"]
    short = ["--warmup", "1", "--export-every", "2", "--log-every", "1", "--time-limit-min", "0"]
    where = ["--corpus", str(corpus), "--out", str(out), "--state", str(tmp_path / "s.pt")]
    train(train_args([*where, *tiny, *short, "--steps", "2"]))
    names = json.loads((out / "labels.json").read_text())
    assert names == json.loads((corpus / "labels.json").read_text())
    assert DiTTransformer2DModel.from_pretrained(out / "transformer").config.num_embeds_ada_norm == 15
    info = json.loads((out / "training.json").read_text())
    assert "Fashion-MNIST" in info["augmentation"] and info["settings"]["corpus"] == str(corpus)

    gate = run_gate(
        gate_args(
            ["--model", str(out), "--corpus", str(corpus), "--per-class", "2", "--steps", "2"]
            + ["--classifier-epochs", "1", "--no-fid", "--threads", "1"]
        )
    )
    saved = json.loads((out / "gate.json").read_text())
    assert saved["classes"] == 15 and len(saved["per_class_accuracy"]) == 15
    assert 0.0 <= saved["class_accuracy"] <= 1.0 and saved["passed"] == (gate["class_accuracy"] >= 0.8)
    assert saved["fid_vs_heldout"] is None and "skipped" in saved["fid_note"]
    assert (out / "gate_samples.png").stat().st_size > 0
    assert list((corpus / "_classifiers").glob("*.pt"))  # cached for the next gate
