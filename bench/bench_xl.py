"""Issue 13 benchmark: DiT-XL/2 in bf16 vs fp32, memory of the base, a slot, a training micro-batch.

On the CPU (no weights can be downloaded: random weights of DiT-XL/2's real
shape, see core/xl_configs.py):

1. bytes of the base by dtype, counted on the meta device for all 28 blocks
   (transformer tied as served; the VAE stays fp32, its config asks for
   force_upcast);
2. bytes of one adapter slot (fp32 tables: biases, gammas, class table) for
   10 / 101 / 1000 classes, from the adapter tensor spec of the default placement;
3. training activation memory per sample at 256 and 512 px: autograd's saved
   tensors summed (unique storages, frozen weights excluded) on 1 and 2
   blocks, scaled to 28 (fixed part + 28 x per block);
4. what fits an 80 GiB GPU: slots beside the base and a training micro-batch,
   and the largest micro-batch beside 64 slots;
5. time ratios bf16 / fp32 on a 2-block XL-shaped model: a sampling forward
   and a training micro-step, interleaved ABAB over several rounds, median and
   spread.

With a GPU (torch.cuda.is_available()) the same script also measures there:
DiT-XL/2 shape, 28 blocks, bf16, 256 px: images/s at 1, 8 and 64 distinct
adapters per batch of 64, and the GPU memory of the base and of each slot.
Without one, ``gpu`` is null.

    python bench/bench_xl.py [--rounds 5]

Writes bench/results/xl.json and bench/results/xl.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.adapter.layers import Route  # noqa: E402
from core.adapter.model import DiffFitDiT, count_params  # noqa: E402
from core.diffusion import GaussianDiffusion  # noqa: E402
from core.xl_configs import DIT_SCHEDULER, SD_VAE_FT_EMA, xl_transformer  # noqa: E402
from difffit.contract import Placement  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
GPU_BYTES = 80 * GIB  # an 80 GB A100/H100
# CUDA context, allocator slack and the sampling batch's activations (batch 64 at
# 256 px, bf16, inference: a few hundred MB); kept free in every "fits" figure.
RUNTIME_RESERVE = 4 * GIB
CLASS_COUNTS = (10, 101, 1000)
RESOLUTIONS = (256, 512)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def base_bytes() -> dict:
    """Bytes of the resident base by dtype: the tied transformer (28 blocks) plus the VAE (fp32)."""
    with torch.device("meta"):
        model = DiffFitDiT(xl_transformer(28, device="meta"), slots=1, max_classes=0, check_ties=False)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**SD_VAE_FT_EMA)
    # Frozen weights plus slot 0 (the base's own biases and class table).
    n_weights = sum(p.numel() for p in model.parameters())
    n_base_adapter = sum(
        t.numel() for t in _shapes_as_tensors(model.adapter_shapes(Placement.bitfit(), 1000))
    )
    n_vae = sum(p.numel() for p in vae.parameters())
    out = {}
    for name, dtype in DTYPES.items():
        size = _bytes(dtype)
        transformer = (n_weights + n_base_adapter) * size
        vae_bytes = n_vae * 4  # force_upcast: the VAE runs in fp32 whatever the base dtype
        out[name] = {"transformer": transformer, "vae": vae_bytes, "total": transformer + vae_bytes}
    out["params"] = {"transformer": n_weights + n_base_adapter, "vae": n_vae}
    return out


def _shapes_as_tensors(shapes: dict) -> list[torch.Tensor]:
    return [torch.empty(s, device="meta") for s in shapes.values()]


def slot_bytes() -> dict:
    """One adapter slot of the default placement, all tables fp32, by class count."""
    with torch.device("meta"):
        model = DiffFitDiT(xl_transformer(28, device="meta"), slots=1, max_classes=0, check_ties=False)
    out = {}
    for c in CLASS_COUNTS:
        counts = count_params(model.adapter_shapes(Placement(), c))
        out[str(c)] = {"params": counts["total"], "bytes": 4 * counts["total"], **counts}
    return out


def _train_forward(
    model: DiffFitDiT, params: dict, batch: int, latent: int, dtype, diffusion
) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, latent, latent, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 101, (batch,), generator=g)
    x_t = diffusion.q_sample(x0, t, noise)
    out = model(x_t.to(dtype), t, y, Route.training(params)).float()
    return diffusion.training_losses(out, x0, x_t, t, noise)["loss"].mean()


def _xl_model(num_layers: int, dtype: torch.dtype) -> tuple[DiffFitDiT, dict]:
    transformer = xl_transformer(num_layers).to(dtype)
    model = DiffFitDiT(transformer, slots=2, max_classes=101)
    g = torch.Generator().manual_seed(1)
    params = {
        k: v.float().requires_grad_(True)
        for k, v in model.init_adapter(Placement(), 101, generator=g).items()
    }
    return model, params


def saved_bytes(model: DiffFitDiT, params: dict, batch: int, latent: int, dtype, diffusion) -> int:
    """Bytes autograd keeps for backward in one training forward: unique storages, frozen weights excluded."""
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in frozen:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        loss = _train_forward(model, params, batch, latent, dtype, diffusion)
    del loss
    return sum(seen.values())


def train_microbatch_bytes(diffusion) -> dict:
    """Saved-activation bytes per sample of a training micro-batch, scaled to 28 blocks, bf16 and fp32."""
    out: dict = {}
    batch = 2
    for res in RESOLUTIONS:
        latent = res // 8
        entry = {}
        for name, dtype in DTYPES.items():
            per_depth = {}
            for depth in (1, 2):
                model, params = _xl_model(depth, dtype)
                per_depth[depth] = saved_bytes(model, params, batch, latent, dtype, diffusion) / batch
                del model, params
            per_block = per_depth[2] - per_depth[1]
            fixed = per_depth[1] - per_block
            per_sample = fixed + 28 * per_block
            entry[name] = {
                "per_sample": int(per_sample),
                "per_block_per_sample": int(per_block),
                "fixed_per_sample": int(fixed),
                "microbatch_32": int(32 * per_sample),
            }
        out[str(res)] = entry
    return out


def fits(base: dict, slots: dict, train: dict) -> dict:
    """What an 80 GiB GPU holds beside the bf16 base (and RUNTIME_RESERVE kept free)."""
    free = GPU_BYTES - base["bfloat16"]["total"] - RUNTIME_RESERVE
    out: dict = {"gpu_bytes": GPU_BYTES, "runtime_reserve_bytes": RUNTIME_RESERVE}
    for res in RESOLUTIONS:
        per_sample = train[str(res)]["bfloat16"]["per_sample"]
        mb32 = 32 * per_sample
        out[f"slots_beside_microbatch_32_at_{res}"] = {
            c: int((free - mb32) // slots[c]["bytes"]) for c in slots
        }
        room = free - 64 * slots["1000"]["bytes"]
        out[f"max_microbatch_at_{res}_beside_64_slots_of_1000_classes"] = int(room // per_sample)
    return out


def _interleaved(fns: dict, rounds: int) -> dict:
    """ABAB...: each round runs every arm once; returns per-arm times and per-round ratios."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - started)
    return times


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timing(diffusion, rounds: int) -> dict:
    """bf16 / fp32 time of a 2-block XL model: sampling forward (8 rows, 256 px) and a training micro-step."""
    arms = {name: _xl_model(2, dtype) for name, dtype in DTYPES.items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    y = torch.randint(0, 1000, (8,), generator=g)

    def sample(name):
        model, _ = arms[name]
        with torch.no_grad():
            model(x.to(DTYPES[name]), t, y, Route.single(0))

    def train(name):
        model, params = arms[name]
        with torch.enable_grad():
            _train_forward(model, params, 2, 32, DTYPES[name], diffusion).backward()
        for p in params.values():
            p.grad = None

    out = {}
    for label, fn in (("sampling_forward_8x256px", sample), ("train_microstep_2x256px", train)):
        for name in DTYPES:  # warm-up
            fn(name)
        times = _interleaved({name: (lambda n=name, f=fn: f(n)) for name in DTYPES}, rounds)
        ratios = [b / f for b, f in zip(times["bfloat16"], times["float32"], strict=True)]
        out[label] = {
            "bfloat16_s": _summary(times["bfloat16"]),
            "float32_s": _summary(times["float32"]),
            "ratio_bf16_over_fp32": _summary(ratios),
        }
    return out


def gpu_arm(rounds: int) -> dict | None:
    """DiT-XL/2 (28 blocks) in bf16 at 256 px on the GPU: images/s by distinct adapters, memory."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    transformer = xl_transformer(28).to(device=device, dtype=torch.bfloat16)
    model = DiffFitDiT(transformer, slots=65, max_classes=101)
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated() - before
    g = torch.Generator().manual_seed(3)
    mem0 = torch.cuda.memory_allocated()
    for s in range(1, 65):
        tensors = model.init_adapter(Placement(), 101, generator=g)
        tensors = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(device) for k, v in tensors.items()}
        model.load_slot(s, tensors)
    slot_mem = (torch.cuda.memory_allocated() - mem0) / 64
    batch, steps = 64, 10
    x = torch.randn(2 * batch, 4, 32, 32, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (2 * batch,), device=device)
    y = torch.randint(0, 101, (2 * batch,), device=device)
    out: dict = {"device": torch.cuda.get_device_name(), "base_bytes_allocated": base_mem}
    out["slot_bytes_allocated"] = slot_mem
    arms = {}
    for distinct in (1, 8, 64):
        slots = [1 + (i % distinct) for i in range(batch)] * 2  # cond + null halves
        route = Route.mixed(slots, device=device)

        def run(route=route):
            with torch.no_grad():
                for _ in range(steps):
                    model(x, t, y, route)
            torch.cuda.synchronize()

        run()
        arms[distinct] = run
    times = _interleaved(arms, rounds)
    for distinct, ts in times.items():
        # One guided denoising step is one forward of 2 x batch rows; a 50-step image needs 50.
        per_step = [t_ / steps for t_ in ts]
        out[f"images_per_s_{distinct}_adapters"] = _summary([batch / (50 * p) for p in per_step])
    out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.2f} MiB"


def markdown(r: dict) -> str:
    b, s, tr, f, tm = (
        r["base_bytes"],
        r["slot_bytes"],
        r["train_microbatch_bytes"],
        r["fits_80gb"],
        r["timing"],
    )
    lines = [
        "# DiT-XL/2 in bf16 and fp32: memory and time (issue 13)",
        "",
        f"`python bench/bench_xl.py` on {r['machine']['cpu']} ({r['machine']['cores']} cores), "
        f"torch {r['machine']['torch']}, load average before/after {r['machine']['loadavg_before']} / "
        f"{r['machine']['loadavg_after']}. Random weights of DiT-XL/2's real shape "
        "(`core/xl_configs.py`); memory counted for all 28 blocks.",
        "",
        "## Base (`base_bytes`)",
        "",
        "| dtype | transformer (tied, 28 blocks) | VAE (fp32: force_upcast) | total |",
        "|---|---|---|---|",
    ]
    for name in DTYPES:
        e = b[name]
        lines.append(f"| {name} | {_gb(e['transformer'])} | {_gb(e['vae'])} | {_gb(e['total'])} |")
    lines += [
        "",
        f"{b['params']['transformer']:,} transformer parameters (per-block embedder copies tied), "
        f"{b['params']['vae']:,} VAE parameters.",
        "",
        "## One adapter slot, fp32 tables, default placement (`slot_bytes`)",
        "",
        "| classes | biases | gammas | class table | total params | bytes |",
        "|---|---|---|---|---|---|",
    ]
    for c, e in s.items():
        lines.append(
            f"| {c} | {e['biases']:,} | {e['gammas']:,} | {e['class_table']:,} | {e['params']:,} | {_gb(e['bytes'])} |"
        )
    lines += [
        "",
        "## Training activations per sample (`train_microbatch_bytes`)",
        "",
        "Bytes autograd saves for backward (the adapter's tensors require grad, so every "
        "layer's input is kept), measured on 1 and 2 blocks and scaled to 28.",
        "",
        "| resolution | dtype | per sample | per block per sample | micro-batch of 32 |",
        "|---|---|---|---|---|",
    ]
    for res, entry in tr.items():
        for name, e in entry.items():
            lines.append(
                f"| {res} px | {name} | {_gb(e['per_sample'])} | {_gb(e['per_block_per_sample'])} | "
                f"{_gb(e['microbatch_32'])} |"
            )
    lines += [
        "",
        f"A batch of 256 at 256 px in one backward would keep {_gb(256 * tr['256']['bfloat16']['per_sample'])} "
        "(bf16): hence micro-batches (`DIFFFIT_TRAIN_MICROBATCH`).",
        "",
        "## What fits an 80 GiB GPU (bf16 base, fp32 slots)",
        "",
        f"Kept free besides the base: {_gb(f['runtime_reserve_bytes'])} (CUDA context, allocator slack, "
        "the sampling batch's activations).",
        "",
    ]
    for res in RESOLUTIONS:
        slots = f[f"slots_beside_microbatch_32_at_{res}"]
        mb = f[f"max_microbatch_at_{res}_beside_64_slots_of_1000_classes"]
        lines.append(
            f"- {res} px: beside a training micro-batch of 32, "
            + ", ".join(f"{n:,} slots of {c} classes" for c, n in slots.items())
            + f"; beside 64 slots of 1000 classes, a micro-batch of up to {mb}."
        )
    lines += ["", "## Time, bf16 / fp32 on this CPU (2 XL-shaped blocks, ABAB rounds)", ""]
    lines += [
        "| workload | bf16 median (s) | fp32 median (s) | ratio median [min, max] |",
        "|---|---|---|---|",
    ]
    for label, e in tm.items():
        q = e["ratio_bf16_over_fp32"]
        lines.append(
            f"| {label} | {e['bfloat16_s']['median']:.3f} | {e['float32_s']['median']:.3f} | "
            f"{q['median']:.2f} [{q['min']:.2f}, {q['max']:.2f}] |"
        )
    lines += [
        "",
        "CPU times say nothing about a GPU; they show the bf16 path runs and what it costs here.",
        "",
    ]
    lines += ["## GPU", ""]
    if r["gpu"] is None:
        lines.append(
            "Not measured: no GPU was lent to the session that ran this (`gpu` is null). "
            "On a machine with CUDA the same command measures images/s at 1, 8 and 64 distinct "
            "adapters per batch of 64 (DiT-XL/2, 28 blocks, bf16, 256 px) and the GPU memory of "
            "the base and of each slot."
        )
    else:
        g = r["gpu"]
        lines.append(
            f"{g['device']}: base {_gb(g['base_bytes_allocated'])}, one slot {_gb(g['slot_bytes_allocated'])}."
        )
        for d in (1, 8, 64):
            e = g[f"images_per_s_{d}_adapters"]
            lines.append(
                f"- {d} distinct adapters per batch of 64: {e['median']:.1f} images/s (50 steps, guidance)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()
    diffusion = GaussianDiffusion.from_scheduler_config(DIT_SCHEDULER)
    base, slots = base_bytes(), slot_bytes()
    train = train_microbatch_bytes(diffusion)
    result = {
        "base_bytes": base,
        "slot_bytes": slots,
        "train_microbatch_bytes": train,
        "fits_80gb": fits(base, slots, train),
        "timing": timing(diffusion, args.rounds),
        "gpu": gpu_arm(args.rounds),
    }
    result["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "xl.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "xl.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
