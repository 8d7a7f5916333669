"""Train the small Fashion-MNIST DiT base model used by demos and tests (CPU, pixel space).

Writes a diffusers-layout folder (default ``base_models/fmnist-dit/``)::

    model_index.json                      DiTPipeline: transformer + scheduler, no VAE
    transformer/config.json               DiTTransformer2DModel config
    transformer/diffusion_pytorch_model.safetensors   EMA weights
    scheduler/scheduler_config.json       DDPMScheduler, linear 1e-4..0.02, learned_range
    labels.json                           the 10 class names, in label order
    training.json                         settings, steps, wall time, losses

Resumable: the full training state is saved every ``--export-every`` steps to
``--state`` (git-ignored), and the EMA model is exported to the output folder at the same
time, so a usable model exists early. ``--resume`` continues from the state file.

Usage (from the repository root)::

    .venv/bin/python base_models/train_base.py               # the committed settings
    .venv/bin/python base_models/train_base.py --resume      # continue after an interruption
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers import DDPMScheduler, DiTTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import LabelEmbedding  # noqa: E402

from base_models.corpus import load_corpus  # noqa: E402
from base_models.tiny import FASHION, scheduler_config_kwargs  # noqa: E402
from core.diffusion import GaussianDiffusion  # noqa: E402

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = FASHION  # the default data set's classes; --corpus brings its own labels.json


# -- data ------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: unsigned-byte images [N, 28, 28] or labels [N]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(data_dir: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as images [N, 1, 32, 32] float32 in [-1, 1] and labels [N] long.

    28x28 is zero-padded (the background value) to 32x32.
    """
    d = Path(data_dir)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2)), constant_values=0).copy())
    x = x.float().div(127.5).sub(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


# -- model -----------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, num_classes: int) -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=1,
        out_channels=2,  # eps + learned-range variance
        num_layers=args.layers,
        sample_size=32,
        patch_size=args.patch_size,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )
    dit_init_(model)
    tie_embedders_(model)
    return model


@torch.no_grad()
def dit_init_(model: DiTTransformer2DModel) -> None:
    """DiT's initialisation (diffusers applies none): xavier linears, N(0, 0.02) embeddings,
    adaLN-Zero modulation and the output layer zeroed, so every block starts as the identity."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    torch.nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def tie_embedders_(model: DiTTransformer2DModel) -> None:
    """Share block 0's timestep embedder + class table with every block while training.

    diffusers gives every block its own copy (and the output layer uses block 0's). The
    original DiT has one shared embedder, and the serving engine ties the copies back at load
    after checking they are equal, so they must stay identical: train one module. On export
    the shared module is written into every block (see ``export``), so the saved checkpoint is
    a plain diffusers model with equal copies.
    """
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


@torch.no_grad()
def init_from_(model: DiTTransformer2DModel, folder: Path) -> None:
    """Warm start: copy the weights of an exported diffusers folder into the (tied) model.

    The exported blocks hold equal copies of the shared embedder (see ``export``); they are
    checked equal before the tied model takes them.
    """
    saved = DiTTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    for key, value in saved.items():
        if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
            first = "transformer_blocks.0." + key.split(".", 2)[2]
            if not torch.equal(value, saved[first]):
                raise ValueError(f"{folder}: {key} differs from block 0's copy; not a tied export")
    model.load_state_dict(saved, strict=True)


def set_train_mode(model: DiTTransformer2DModel) -> None:
    """Train mode, except the label embedder, which stays in eval mode.

    In train mode diffusers' LabelEmbedding (class_dropout_prob 0.1, hard-coded by
    CombinedTimestepLabelEmbeddings) draws a fresh dropout mask on every call, and it is called
    once per block plus once for the output layer: a sample would be "unconditional" in some
    blocks and conditional in others. We drop labels ourselves, once per sample, by replacing
    them with the null index (num_classes) before the forward (see ``train``); in eval mode with
    ``force_drop_ids=None`` LabelEmbedding just looks the labels up.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()


# -- export ----------------------------------------------------------------------------------


def export(ema: DiTTransformer2DModel, out: Path, info: dict, labels: list[str]) -> None:
    """Write the diffusers folder from the (tied) EMA model; untied copies on disk."""
    out.mkdir(parents=True, exist_ok=True)
    plain = DiTTransformer2DModel.from_config(ema.config)
    # state_dict() lists the shared embedder under every block's prefix: strict load checks
    # that every key of the plain model is filled.
    plain.load_state_dict(ema.state_dict(), strict=True)
    plain.save_pretrained(out / "transformer", safe_serialization=True)
    DDPMScheduler(**scheduler_config_kwargs()).save_pretrained(out / "scheduler")
    import diffusers

    model_index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    (out / "labels.json").write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n")
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


# -- training --------------------------------------------------------------------------------


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``min_lr_frac * lr`` at ``args.steps`` (constant if 1.0)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=FMNIST_DIR)
    p.add_argument("--corpus", default="", help="train on a build_corpus.py folder instead of Fashion-MNIST")
    p.add_argument("--class-subset", type=int, default=0, help="with --corpus: keep N classes spread evenly")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (cuda)")
    p.add_argument("--out", default=str(REPO / "base_models" / "fmnist-dit"))
    p.add_argument("--state", default=str(REPO / "base_models" / "_state" / "fmnist-dit.pt"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default="", help="warm start from an exported folder (new optimizer)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--min-lr-frac", type=float, default=1.0, help="cosine floor; 1.0 = constant after warmup")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--vlb-weight", type=float, default=1.0, help="1.0 = iDDPM hybrid lambda=0.001 (T=1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--export-every", type=int, default=200)
    p.add_argument("--time-limit-min", type=float, default=42.0, help="stop and export after this (0 = none)")
    p.add_argument(
        "--fit-steps-to-time",
        action="store_true",
        help="set --steps from the rate over steps 50-150: the cosine decay ends with the time limit",
    )
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, state_path = Path(args.out), Path(args.state)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # the generator's device must match
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (EMA, loss); the forward is bf16

    if args.corpus:
        corpus = load_corpus(args.corpus, "train", args.class_subset)
        x_all, y_all, labels, flippable = corpus.images, corpus.labels, corpus.names, corpus.flippable
        dataset = f"corpus {args.corpus} ({len(labels)} classes, {x_all.shape[0]} images), 32x32, [-1, 1]"
        augmentation = "random horizontal flip of the flip_classes (Fashion-MNIST) only"
    else:
        x_all, y_all = load_fmnist(args.data_dir, "train")
        labels, flippable = LABELS, torch.ones(len(LABELS), dtype=torch.bool)
        dataset = "Fashion-MNIST train (60000), 28x28 zero-padded to 32x32, [-1, 1], 1 channel"
        augmentation = "random horizontal flip"
    num_classes = len(labels)
    x_all, y_all, flippable = x_all.to(dev), y_all.to(dev), flippable.to(dev)
    n = x_all.shape[0]
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02)

    model = build_model(args, num_classes)
    if args.init_from:
        init_from_(model, Path(args.init_from))
        print(f"initialised from {args.init_from}", flush=True)
    model.to(dev)
    ema = copy.deepcopy(model).eval()  # deepcopy keeps the shared embedder shared
    ema.requires_grad_(False)
    params = list(model.parameters())  # deduplicated: the shared embedder appears once
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    # per-step draws on the training device: a CPU draw copied to a GPU would wait for the GPU
    # every step (a pageable copy is ordered after the queued kernels); on the CPU it is ``gen``
    dgen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(args.seed + 1)

    step, wall_before, history, phases = 0, 0.0, [], []
    steps_before = 0  # steps of the model this run was initialised from (--init-from)
    if args.init_from and (Path(args.init_from) / "training.json").exists():
        prior = json.loads((Path(args.init_from) / "training.json").read_text())
        steps_before = prior.get("steps_before", 0) + prior["steps_done"]
        phases = prior.get("earlier_phases", []) + [
            {**prior["settings"], "until_step": prior["steps_done"], "wall_s": prior["wall_time_s"]}
        ]
    if args.resume and state_path.exists():
        st = torch.load(state_path, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"].cpu())
        if dgen is not gen and "dgen" in st:
            dgen.set_state(st["dgen"].cpu())
        step, wall_before, history = st["step"], st["wall_s"], st["history"]
        phases, steps_before = st.get("phases", []), st.get("steps_before", 0)
        phases = phases + [{**st["args"], "until_step": step, "wall_s": round(wall_before, 1)}]
        print(f"resumed from {state_path} at step {step}", flush=True)

    n_params = sum(p.numel() for p in params)
    n_saved = sum(p.numel() for p in DiTTransformer2DModel.from_config(model.config).parameters())
    print(
        f"params: {n_params / 1e6:.3f}M trained (shared embedder), {n_saved / 1e6:.3f}M in the saved model",
        flush=True,
    )

    def info(status: str) -> dict:
        last = history[-1] if history else {}
        return {
            "status": status,
            "dataset": dataset,
            "model": {k: v for k, v in model.config.items() if not k.startswith("_")},
            "params_trained": n_params,
            "params_saved": n_saved,
            "objective": (
                "eps MSE + vlb_weight * vb (iDDPM/DiT hybrid, learned_range variance, vb with detached eps); "
                "vlb_weight 1.0 on the per-step vb term equals iDDPM lambda=0.001 on L_vlb for T=1000"
            ),
            "settings": {k: v for k, v in vars(args).items() if k not in ("resume",)},
            "earlier_phases": phases,  # settings of runs this one resumed from, with their last step
            "label_dropout": (
                f"once per sample to the null index {num_classes}, in train_base.py (embedder in eval mode)"
            ),
            "optimizer": (
                f"AdamW(betas=(0.9, 0.999), wd={args.weight_decay}), "
                f"warmup {args.warmup}, cosine floor {args.min_lr_frac}"
            ),
            "ema": f"decay min({args.ema_decay}, (1+step)/(10+step)); the saved weights are the EMA",
            "augmentation": augmentation,
            "steps_done": step,
            "steps_before": steps_before,  # in the phases before --init-from
            "wall_time_s": round(wall_before + (time.time() - t_start), 1),
            "threads": args.threads,
            "torch": torch.__version__,
            "final_loss_ema100": last.get("loss_ema"),
            "final_mse_ema100": last.get("mse_ema"),
            "final_vb_ema100": last.get("vb_ema"),
            "loss_history": history[-40:],
        }

    def save_state() -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        wall = wall_before + (time.time() - t_start)
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "dgen": dgen.get_state(),
                "step": step,
                "wall_s": wall,
                "history": history,
                "args": vars(args),
                "phases": phases,
                "steps_before": steps_before,
            },
            tmp,
        )
        tmp.replace(state_path)

    t_start = time.time()
    set_train_mode(model)
    perm, pos = torch.randperm(n, generator=gen).to(dev), 0
    sm: dict[str, torch.Tensor | None] = {"loss": None, "mse": None, "vb": None}  # moving averages, on dev
    t_log = time.time()
    first_step = step
    while step < args.steps:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen).to(dev), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0, y = x_all[idx], y_all[idx]
        b = x0.shape[0]
        flip = (torch.rand(b, generator=dgen, device=dev) < 0.5) & flippable[y]  # Fashion classes only
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        drop = torch.rand(b, generator=dgen, device=dev) < args.label_dropout
        y = torch.where(drop, torch.full_like(y, num_classes), y)  # null class, once per sample
        t = diffusion.sample_timesteps(b, generator=dgen, device=dev)
        noise = torch.randn(x0.shape, generator=dgen, device=dev)
        x_t = diffusion.q_sample(x0, t, noise)

        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            out_model = model(x_t, timestep=t, class_labels=y).sample
        terms = diffusion.training_losses(out_model.float(), x0, x_t, t, noise, vlb_weight=args.vlb_weight)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        step += 1
        if args.fit_steps_to_time and step == first_step + 50:
            t_fit = time.time()
        elif args.fit_steps_to_time and step == first_step + 150 and args.time_limit_min > 0:
            # the cosine schedule should end when the time does: measured rate x time left
            rate = 100 / (time.time() - t_fit)
            left = 60 * args.time_limit_min - (time.time() - t_start)
            args.steps = step + max(1, int(0.97 * rate * left))
            print(
                f"fit steps to time: {rate:.2f} steps/s, {left:.0f} s left -> --steps {args.steps}",
                flush=True,
            )

        with torch.no_grad():  # kept on the device: no host sync per step
            for k in sm:
                v = terms[k].detach().mean().float()
                sm[k] = v if sm[k] is None else 0.99 * sm[k] + 0.01 * v
        if step % args.log_every == 0 or step == args.steps:
            el = wall_before + time.time() - t_start
            rate = args.log_every / (time.time() - t_log)
            t_log = time.time()
            rec = {
                "step": step,
                "loss": round(loss.item(), 5),
                "loss_ema": round(float(sm["loss"]), 5),
                "mse_ema": round(float(sm["mse"]), 5),
                "vb_ema": round(float(sm["vb"]), 5),
                "lr": lr_at(step - 1, args),
                "wall_s": round(el, 1),
            }
            history.append(rec)
            print(json.dumps(rec) + f"  ({rate:.2f} it/s)", flush=True)
        over_time = args.time_limit_min > 0 and (time.time() - t_start) > 60 * args.time_limit_min
        if step % args.export_every == 0 or step == args.steps or over_time:
            save_state()
            status = "complete" if step == args.steps else ("stopped_time_limit" if over_time else "partial")
            export(ema, out, info(status), labels)
            print(f"exported EMA at step {step} to {out} ({status})", flush=True)
        if over_time:
            break
    print("done", flush=True)


if __name__ == "__main__":
    train(parse_args())
