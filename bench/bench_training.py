"""Issue 4 benchmark: fine-tuning cost, and sampling latency while a job trains.

1. Step time and peak memory of DiffFit vs full fine-tuning on the same model
   (DiT-S/2 shape, random weights). Each variant runs in a child process of
   this one run, so peak RSS is its own; the trainable-state bytes (params +
   grads + AdamW moments) are reported too (paper: DiffFit 0.49x the time).
2. Generate latency p50/p99 on one engine, alone and with a training job
   interleaved on the same resident base.

    python bench/bench_training.py [--latent 8] [--batch 16] [--steps 20]

Writes bench/results/training.json and bench/results/training.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import NUM_CLASSES, _scheduler_config, dit_s, pct  # noqa: E402
from core.adapter.model import DiffFitDiT  # noqa: E402
from core.base_model import BaseModel  # noqa: E402
from core.diffusion import GaussianDiffusion  # noqa: E402
from core.engine.engine import Engine  # noqa: E402
from core.engine.sampling import SampleRequest  # noqa: E402
from core.engine.training import TrainingData, TrainingRun  # noqa: E402
from difffit.contract import FinetuneRequest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _data(latent: int, n: int = 256) -> TrainingData:
    g = torch.Generator().manual_seed(0)
    return TrainingData(
        torch.randn(n, 4, latent, latent, generator=g),
        torch.randint(0, NUM_CLASSES, (n,), generator=g),
        [str(i) for i in range(NUM_CLASSES)],
    )


def run_variant(variant: str, latent: int, batch: int, steps: int) -> dict:
    """One training variant in this process: median step seconds, peak RSS, trainable bytes."""
    diffusion = GaussianDiffusion.from_scheduler_config(_scheduler_config())
    data = _data(latent)
    request = FinetuneRequest(
        dataset_url="bench", adapter="bench", steps=10**6, batch_size=batch,
        method="bitfit" if variant == "bitfit" else "difffit",
        learning_rate=1e-4 if variant == "full" else 1e-3,
    )  # fmt: skip
    if variant == "full":
        model = dit_s(latent).train()
        model.requires_grad_(True)
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)

        def step():
            idx = torch.randint(0, data.x.shape[0], (batch,), generator=g)
            x0, y = data.x[idx], data.labels[idx]
            t = diffusion.sample_timesteps(batch, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            x_t = diffusion.q_sample(x0, t, noise)
            out = model(x_t, timestep=t, class_labels=y).sample
            loss = diffusion.training_losses(out, x0, x_t, t, noise, 1.0)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        trainable = sum(p.numel() for p in params)
    else:
        model = DiffFitDiT(dit_s(latent), slots=2, max_classes=NUM_CLASSES)
        run = TrainingRun(model, diffusion, data, request)
        step = run.step
        trainable = sum(v.numel() for v in run.params.values())
    times = []
    with torch.enable_grad():
        for i in range(steps + 3):
            t0 = time.perf_counter()
            step()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": trainable,
        "trainable_state_mb": trainable * 4 * 4 / 2**20,  # fp32 param + grad + 2 Adam moments
    }


def generate_latency(latent: int, requests: int, with_training: bool) -> list[float]:
    """Latency of `requests` generate calls, one after another, on one engine."""
    base = BaseModel("bench", "0" * 64, dit_s(latent), None, _scheduler_config(), [str(i) for i in range(10)])
    engine = Engine(base, slots=4, max_classes=NUM_CLASSES, max_batch_size=64).start()
    try:
        if with_training:
            diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
            request = FinetuneRequest(dataset_url="bench", adapter="bench", steps=10**6, batch_size=16)
            run = engine.call(lambda: TrainingRun(engine.model, diffusion, _data(latent), request)).result()
            engine.submit_training(run)
        out = []
        for i in range(requests + 2):
            r = SampleRequest(f"g{i}", None, None, [i % NUM_CLASSES], i, 10, 4.0, "ddim", latent)
            t0 = time.perf_counter()
            engine.submit(r).result()
            if i >= 2:
                out.append(time.perf_counter() - t0)
        if with_training:
            run.cancel.set()
        return out
    finally:
        engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.latent, args.batch, args.steps)))
        return 0
    # Two rounds, variants alternating, the lower median kept: background load then
    # hits every variant alike instead of whichever ran during a busy minute.
    variants: dict[str, dict] = {}
    for _ in range(2):
        for variant in ("full", "difffit", "bitfit"):
            cmd = [sys.executable, __file__, "--variant", variant, "--latent", str(args.latent),
                   "--batch", str(args.batch), "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            if variant not in variants or result["step_s"] < variants[variant]["step_s"]:
                variants[variant] = result
    alone = generate_latency(args.latent, args.requests, with_training=False)
    training = generate_latency(args.latent, args.requests, with_training=True)
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "shape": {"model": "DiT-S/2", "latent": args.latent, "batch": args.batch},
        "variants": variants,
        "difffit_over_full_step_time": variants["difffit"]["step_s"] / variants["full"]["step_s"],
        "bitfit_over_full_step_time": variants["bitfit"]["step_s"] / variants["full"]["step_s"],
        "difffit_over_full_peak_rss": variants["difffit"]["peak_rss_mb"] / variants["full"]["peak_rss_mb"],
        "generate_alone": {"p50_s": pct(alone, 50), "p99_s": pct(alone, 99)},
        "generate_with_training": {"p50_s": pct(training, 50), "p99_s": pct(training, 99)},
    }
    results["generate_p50_ratio"] = (
        results["generate_with_training"]["p50_s"] / results["generate_alone"]["p50_s"]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "training.md").write_text(render(results, args))
    print(render(results, args))
    return 0


def render(r: dict, args) -> str:
    v = r["variants"]
    rows = "\n".join(
        f"| {k} | {x['trainable_params']:,} | {1e3 * x['step_s']:.1f} ms | {x['peak_rss_mb']:.0f} MB | {x['trainable_state_mb']:.1f} MB |"
        for k, x in v.items()
    )
    a, t = r["generate_alone"], r["generate_with_training"]
    return f"""# Training benchmark (issue 4)

`python bench/bench_training.py --latent {args.latent} --batch {args.batch} --steps {args.steps}` —
DiT-S/2 shape, random weights, {args.latent}x{args.latent}x4 latents, batch {args.batch}, CPU
({r["machine"]["threads"]} threads), torch {r["machine"]["torch"]}. One run; each variant in its own child
process, two alternating rounds, the lower median step time kept.

| variant | trainable params | step time (median) | peak RSS | params+grads+AdamW |
|---|---|---|---|---|
{rows}

- DiffFit / full fine-tuning step time: **{r["difffit_over_full_step_time"]:.2f}x** (paper: 0.49x); BitFit / full: {r["bitfit_over_full_step_time"]:.2f}x
- DiffFit / full fine-tuning peak RSS: **{r["difffit_over_full_peak_rss"]:.2f}x**

Generate latency (10 DDIM steps, guidance 4, one image), {args.requests} requests one after another on one engine:

| | p50 | p99 |
|---|---|---|
| engine alone | {a["p50_s"]:.3f} s | {a["p99_s"]:.3f} s |
| a training job interleaved on the same base | {t["p50_s"]:.3f} s | {t["p99_s"]:.3f} s |

With training / alone, p50: **{r["generate_p50_ratio"]:.2f}x** (while requests sample, training gets at most 20% of engine time; one training step is not preempted).
"""


if __name__ == "__main__":
    sys.exit(main())
