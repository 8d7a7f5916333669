"""The study command: a small-scale Table 1 of the DiffFit paper, with real FID.

    python -m bench.paper.study [--quick] [--steps N] [--samples N] [--out bench/results]

For each data set (MNIST, Animal-MNIST, OpenCV digits) and each method (full
fine-tuning, BitFit, DiffFit, LoRA, DiffFit + Diff-Tuning), with the same
steps, batch and seed: fine-tune the Fashion-MNIST base, draw ``--samples``
images uniformly over the classes (DDIM, guidance 1.5), and measure

- FID against as many held-out test images (Inception-v3 pool features),
- the accuracy of a small CNN (trained on the real train split) on the samples
  under the labels they were asked for,
- trainable parameters, adapter bytes and training wall time.

Then the gamma-placement ablation on one data set. Writes ``paper.json``,
``paper.md`` and ``paper_samples_<method>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from core.engine.training import TrainingData
from difffit.contract import Placement

from .classifier import accuracy, train_classifier
from .data import DATASETS, ImageSet, load_dataset
from .fid import FeatureStats, InceptionFeatures, bootstrap_std, frechet_distance
from .methods import LEARNING_RATES, LORA_RANK, LORA_TARGETS, METHODS, StudyBase, finetune, finetune_adapter
from .report import render, statements
from .sampling import balanced_labels, grid_image, sample_images

REPO = Path(__file__).resolve().parents[2]
ABLATION = {  # gamma on Q/K/V and on both residual branches of these blocks; final layer always
    "none": Placement(qkv="none", branches="none", final_layer=True),
    "first_half": Placement(qkv="first_half", branches="first_half", final_layer=True),
    "all": Placement(qkv="all", branches="all", final_layer=True),
}
GRID_COLUMNS = 4  # samples per class per data set in the sample grids


@dataclass(frozen=True)
class Config:
    """Everything that decides the numbers (written into paper.json)."""

    # Sized for 2 idle CPU threads: the wall time of the committed run is in paper.md.
    steps: int = 500
    batch_size: int = 16
    samples: int = 120  # generated images per method and data set = real test images for FID
    sample_steps: int = 25  # DDIM steps (paper: 50)
    guidance: float = 1.5  # the paper's FID setting
    retention: int = 120  # base samples for Diff-Tuning
    classifier_epochs: int = 5
    seed: int = 0
    datasets: tuple[str, ...] = DATASETS
    ablation_dataset: str = "mnist"
    threads: int = 2


QUICK = Config(steps=10, samples=20, sample_steps=10, retention=20, classifier_epochs=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """n images ordered like balanced_labels(n, C): image i has class i mod C."""
    per_class = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    idx = [per_class[c][i // num_classes] for i, c in enumerate(balanced_labels(n, num_classes))]
    return x[torch.stack(idx)]


def flip_half(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Mirror a seeded half of the images (the fine-tuned models are trained with flips)."""
    flip = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Features:
    """Inception features, with real-image features cached on disk by content hash."""

    def __init__(self, cache: Path | None):
        self.net = InceptionFeatures()
        self.cache = cache
        self.seconds = 0.0
        self.images = 0

    def __call__(self, images: torch.Tensor, cache_key: str | None = None) -> np.ndarray:
        path = None
        if self.cache is not None and cache_key is not None:
            digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
            path = self.cache / f"{cache_key}-{digest}.npy"
            if path.is_file():
                return np.load(path)
        t0 = time.perf_counter()
        feats = self.net(images)
        self.seconds += time.perf_counter() - t0
        self.images += images.shape[0]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, feats)
        return feats


class Study:
    """One run of the study: state shared by the data sets and methods."""

    def __init__(self, cfg: Config, base_dir: str, cache: Path | None):
        self.cfg = cfg
        self.base = StudyBase(base_dir)
        self.features = Features(cache)
        self.timings: dict[str, float] = {"train": 0.0, "sample": 0.0, "classifier": 0.0}
        self.grids: dict[str, list[torch.Tensor]] = {}

    def sample(self, model, slot: int, labels: list[int], null_label: int, seed: int) -> torch.Tensor:
        t0 = time.perf_counter()
        images = sample_images(model, self.base.scheduler_config, labels, null_label, slot=slot, seed=seed,
                               steps=self.cfg.sample_steps, guidance=self.cfg.guidance)  # fmt: skip
        self.timings["sample"] += time.perf_counter() - t0
        return images

    def retention_set(self) -> torch.Tensor:
        """Diff-Tuning's retention data: samples of the base over its own classes."""
        c = self.base.base_num_classes
        labels = balanced_labels(self.cfg.retention, c)
        return self.sample(self.base.model, 0, labels, c, seed=self.cfg.seed + 10_000)

    def evaluate(self, ft, data: ImageSet, real: FeatureStats, clf) -> tuple[dict, torch.Tensor]:
        """Sample, FID, bootstrap spread and conditioning accuracy of one fine-tuned model."""
        labels = balanced_labels(self.cfg.samples, data.num_classes)
        images = self.sample(ft.sampler, ft.slot, labels, ft.null_label, seed=self.cfg.seed)
        feats = self.features(images)
        row = {
            "fid": frechet_distance(real, FeatureStats.of(feats)),
            "fid_bootstrap_std": bootstrap_std(real, feats, seed=self.cfg.seed),
            "cond_acc": accuracy(clf, images, torch.tensor(labels), mirror_tolerant=True),
            "train_seconds": ft.train_seconds,
            "final_loss": ft.final_loss,
            "trainable_params": ft.trainable_params,
            "adapter_bytes": ft.adapter_bytes,
        }
        return row, images

    def run_dataset(self, name: str, retention: torch.Tensor, results: dict) -> None:
        cfg = self.cfg
        data = load_dataset(name, seed=cfg.seed)
        log(f"{name}: {len(data.train_y)} train / {len(data.test_y)} test")
        t0 = time.perf_counter()
        clf = train_classifier(
            data.train_x, data.train_y, data.num_classes, epochs=cfg.classifier_epochs, seed=cfg.seed
        )
        self.timings["classifier"] += time.perf_counter() - t0
        n, c = cfg.samples, data.num_classes
        ref = flip_half(balanced_subset(data.test_x, data.test_y, n, c), cfg.seed)
        floor = flip_half(balanced_subset(data.train_x, data.train_y, n, c), cfg.seed + 1)
        real = FeatureStats.of(self.features(ref, f"{name}-test-n{n}"))
        floor_feats = self.features(floor, f"{name}-train-n{n}")
        results["datasets"][name] = {
            "classes": data.class_names,
            "train": len(data.train_y),
            "test": len(data.test_y),
            "classifier_test_acc": accuracy(clf, data.test_x, data.test_y),
            # the same mirror-tolerant score on the (half mirrored) real reference: the ceiling
            "classifier_real_ref_acc": accuracy(
                clf, ref, torch.tensor(balanced_labels(n, c)), mirror_tolerant=True
            ),
            "fid_real_train_vs_test": frechet_distance(real, FeatureStats.of(floor_feats)),
        }
        self.grids.setdefault("real", []).append(ref[: GRID_COLUMNS * c])
        train = TrainingData(data.train_x, data.train_y, data.class_names, retention=retention)
        for method in METHODS:
            ft = finetune(self.base, train, method, cfg.steps, cfg.batch_size, cfg.seed)
            self.timings["train"] += ft.train_seconds
            row, images = self.evaluate(ft, data, real, clf)
            results["runs"].setdefault(method, {})[name] = row
            self.grids.setdefault(method, []).append(images[: GRID_COLUMNS * c])
            log(
                f"{name} {method}: FID {row['fid']:.1f} acc {row['cond_acc']:.2f} train {ft.train_seconds:.0f}s"
            )
        if name == cfg.ablation_dataset:
            self.run_ablation(train, data, real, clf, results)

    def run_ablation(
        self, train: TrainingData, data: ImageSet, real: FeatureStats, clf, results: dict
    ) -> None:
        """DiffFit with gamma in no blocks / the first half / all blocks (final layer always)."""
        for span, placement in ABLATION.items():
            ft = finetune_adapter(self.base, train, "difffit", self.cfg.steps, self.cfg.batch_size,
                                  self.cfg.seed, placement=placement)  # fmt: skip
            self.timings["train"] += ft.train_seconds
            row, _ = self.evaluate(ft, data, real, clf)
            results["ablation"]["rows"][span] = {"placement": placement.model_dump(), **row}
            log(f"ablation {span}: FID {row['fid']:.1f} acc {row['cond_acc']:.2f}")

    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        results: dict = {
            "config": asdict(cfg),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": cfg.threads},
            "base": {
                "source": self.base.source,
                "sha256": self.base.content_hash,
                "total_params": self.base.total_params,
            },
            "methods": {m: {"learning_rate": LEARNING_RATES[m]} for m in METHODS},
            "lora": {
                "rank": LORA_RANK,
                "alpha": LORA_RANK,
                "targets": LORA_TARGETS,
                "plus": "new class table",
            },
            "datasets": {},
            "runs": {},
            "ablation": {"dataset": cfg.ablation_dataset, "rows": {}},
        }
        log("sampling the Diff-Tuning retention set from the base")
        retention = self.retention_set()
        for name in cfg.datasets:
            self.run_dataset(name, retention, results)
        self.timings["fid_features"] = self.features.seconds
        self.timings["fid_images"] = self.features.images
        results["timings"] = self.timings
        results["wall_seconds"] = time.perf_counter() - start
        summarize(results)
        results["statements"] = statements(results)
        return results


def summarize(results: dict) -> None:
    """Per-method averages, parameter shares and time relative to full fine-tuning."""
    total = results["base"]["total_params"]
    full_time = sum(r["train_seconds"] for r in results["runs"].get("full", {}).values()) or None
    for method, runs in results["runs"].items():
        m = results["methods"][method]
        m["fid"] = {d: r["fid"] for d, r in runs.items()}
        m["fid_avg"] = float(np.mean(list(m["fid"].values())))
        # spread of the average if the per-set errors were independent
        m["fid_avg_std"] = float(np.sqrt(sum(r["fid_bootstrap_std"] ** 2 for r in runs.values())) / len(runs))
        m["cond_acc"] = {d: r["cond_acc"] for d, r in runs.items()}
        m["cond_acc_avg"] = float(np.mean(list(m["cond_acc"].values())))
        first = next(iter(runs.values()))
        m["trainable_params"] = first["trainable_params"]
        m["trainable_pct"] = 100.0 * first["trainable_params"] / total
        m["adapter_bytes"] = first["adapter_bytes"]
        m["train_seconds"] = sum(r["train_seconds"] for r in runs.values())
        m["train_time_rel_full"] = m["train_seconds"] / full_time if full_time else None


def write_outputs(results: dict, grids: dict[str, list[torch.Tensor]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(results, indent=2))
    (out / "paper.md").write_text(render(results))
    for method, panels in grids.items():
        rows = max(len(results["datasets"][d]["classes"]) for d in results["datasets"])
        grid_image(panels, rows=rows).save(out / f"paper_samples_{method}.png")


def parse_config(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny steps/samples, a few minutes (development)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per method and data set")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--samples", type=int, help="generated = real images per FID")
    parser.add_argument("--sample-steps", type=int, help="DDIM steps")
    parser.add_argument("--datasets", help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--base", default=str(REPO / "base_models" / "fmnist-dit"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "difffit-paper"),
                        help="real-image feature cache ('' to disable)")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    overrides = {
        k: getattr(args, k) for k in ("steps", "batch_size", "samples", "sample_steps", "threads", "seed")
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.datasets:
        cfg = replace(cfg, datasets=tuple(args.datasets.split(",")))
    if cfg.ablation_dataset not in cfg.datasets:
        cfg = replace(cfg, ablation_dataset=cfg.datasets[0])
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log(f"config: {cfg}")
    study = Study(cfg, args.base, Path(args.cache) if args.cache else None)
    results = study.run()
    results["quick"] = bool(args.quick)
    write_outputs(results, study.grids, Path(args.out))
    log(f"done in {results['wall_seconds']:.0f}s; wrote {args.out}/paper.md")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
