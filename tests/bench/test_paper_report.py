"""The report's statements are computed from the numbers, not written in."""

from __future__ import annotations

import copy

from bench.paper.report import render, statements
from bench.paper.study import summarize

SETS = ("mnist", "animal")


def fake_results(fids: dict[str, float], ablation: dict[str, float]) -> dict:
    def row(method: str, fid: float) -> dict:
        seconds = 10.0 if method == "full" else 5.0
        return {"fid": fid, "fid_bootstrap_std": 0.5, "cond_acc": 0.9, "train_seconds": seconds,
                "final_loss": 0.1, "trainable_params": 100, "adapter_bytes": 500}  # fmt: skip

    runs = {m: {d: row(m, f) for d in SETS} for m, f in fids.items()}
    results = {
        "config": {"steps": 1, "batch_size": 2, "seed": 0, "sample_steps": 2, "guidance": 1.5, "samples": 4,
                   "classifier_epochs": 1},
        "machine": {"threads": 1},
        "base": {"source": "x", "total_params": 1000},
        "methods": {m: {"learning_rate": 1e-3} for m in fids},
        "lora": {"rank": 8, "alpha": 8, "targets": ["to_q"]},
        "datasets": {d: {"classes": ["a"], "train": 8, "test": 2, "classifier_test_acc": 0.99,
                         "classifier_real_ref_acc": 0.9, "fid_real_train_vs_test": 1.0} for d in SETS},
        "runs": runs,
        "ablation": {"dataset": "mnist", "rows": {k: {"fid": v, "fid_bootstrap_std": 0.5, "cond_acc": 0.9,
                                                      "trainable_params": 1} for k, v in ablation.items()}},
        "timings": {"train": 1, "sample": 1, "fid_features": 1, "fid_images": 1, "classifier": 1},
        "wall_seconds": 5,
    }  # fmt: skip
    summarize(results)
    return results


PAPER_LIKE = {"difffit": 10.0, "full": 12.0, "bitfit": 14.0, "lora": 40.0, "diff_tuning": 8.0}


def test_statements_agree_when_the_numbers_follow_the_paper():
    r = fake_results(PAPER_LIKE, {"none": 12.0, "first_half": 9.0, "all": 11.0})
    text = " ".join(statements(r))
    assert "disagrees" not in text
    assert "DiffFit <= Full fine-tuning: agrees" in text
    assert "LoRA is 2.9x BitFit" in text
    assert "lower on 2/2 data sets" in text
    assert "gamma in the first half of the blocks" in text
    assert r["methods"]["difffit"]["train_time_rel_full"] == 0.5


def test_statements_disagree_when_the_numbers_do_not():
    flipped = dict(PAPER_LIKE, difffit=13.0, lora=15.0, diff_tuning=20.0)
    r = fake_results(flipped, {"none": 8.0, "first_half": 9.0, "all": 11.0})
    lines = statements(r)
    assert any(line.startswith("DiffFit <= Full fine-tuning: disagrees") for line in lines)
    assert any("agrees only in direction" in line for line in lines)
    assert any("Diff-Tuning" in line and "disagrees" in line for line in lines)
    assert any("gamma in no blocks" in line and "disagrees" in line for line in lines)


def test_render_marks_quick_runs():
    r = fake_results(PAPER_LIKE, {"none": 1.0})
    r["statements"] = statements(r)
    assert "QUICK RUN" not in render(r)
    q = copy.deepcopy(r)
    q["quick"] = True
    assert "QUICK RUN" in render(q)


def test_statements_call_gaps_within_the_noise_inconclusive():
    close = dict(PAPER_LIKE, difffit=12.2, diff_tuning=12.0)  # gaps of 0.2 with spreads of ~0.5
    r = fake_results(close, {"none": 9.0, "first_half": 9.3, "all": 11.0})
    lines = statements(r)
    assert any(
        line.startswith("DiffFit <= Full fine-tuning: inconclusive (the direction disagrees")
        for line in lines
    )
    assert any("Diff-Tuning" in line and "inconclusive (the direction agrees" in line for line in lines)
    assert any("gamma in no blocks" in line and "inconclusive" in line for line in lines)
    assert any(line.startswith("Full fine-tuning < BitFit: agrees with the paper") for line in lines)
