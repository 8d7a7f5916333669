"""A fine-tuning run the engine thread steps, on the resident base.

The job's adapter is a dict of live fp32 tensors that require grad (the
master copies, fp32 whatever the base's dtype: a bf16 gamma cannot hold
1.002); the frozen base is shared with sampling (no second copy). One
optimizer step of the DiT hybrid loss (L_simple + lambda L_vlb with the
learned variance, lambda = 0.001 on L_vlb, i.e. weight 1.0 on the per-step
vb term as DiT trains), with 10% label dropout to the adapter's null row,
random horizontal flips and AdamW (weight decay 0), is a sequence of
micro-steps: the step's batch is drawn once, then split into micro-batches
of ``microbatch`` rows whose gradients accumulate, so the engine can run
sampling steps between them (:meth:`TrainingRun.micro_step`). Each
micro-batch's loss carries its rows' share of the step's loss, so the sum
of the micro-batch gradients is the whole batch's gradient.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from core.adapter.layers import Route
from core.adapter.model import CLASS_TABLE, DiffFitDiT
from core.diffusion import GaussianDiffusion
from difffit.contract import FinetuneRequest
from difffit.errors import InvalidDataset, JobCancelled, NonFiniteLoss, UnsupportedPrecision

LABEL_DROPOUT = 0.1
VLB_WEIGHT = 1.0  # on the per-step vb term == lambda 0.001 on L_vlb (T = 1000)
# Diff-Tuning (Zhong et al. 2024, as coded in thuml/Diffusion-Tuning): 20% of each
# batch is retention data, its loss weighted 0.1; target t biased to the noisy end,
# retention t to the clean end; retention samples carry the null label.
RETENTION_FRACTION = 0.2
RETENTION_WEIGHT = 0.1
# EMA of the adapter tensors with the usual warm-up: after the n-th optimizer step the
# decay is min(EMA_DECAY, (1 + n) / (10 + n)), so early steps are not averaged with the
# initial values for thousands of steps (a fixed 0.999 kept 82% of the init after 200).
EMA_DECAY = 0.999


def ema_decay(n: int) -> float:
    """Decay of the EMA update after optimizer step n (1-based)."""
    return min(EMA_DECAY, (1 + n) / (10 + n))


@dataclass
class TrainingData:
    """A decoded data set: x [N, C, h, w] (latents if a VAE, else pixels), labels [N].

    x may live on the host (a job's set is there, in the base's dtype, possibly
    a memory-mapped file) or on the device: :func:`draw_batch` indexes it where
    it is and moves only the drawn rows. retention [R, C, h, w]: samples of the
    base model, for the Diff-Tuning objective (also indexed where it lives).
    """

    x: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    retention: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Progress:
    """What the task thread reads while the engine trains (plain values, thread-safe enough)."""

    step: int = 0
    total: int = 0
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @property
    def eta_s(self) -> float | None:
        if self.step == 0:
            return None
        return (time.time() - self.started_at) / self.step * (self.total - self.step)


def draw_batch(
    data: TrainingData,
    diffusion: GaussianDiffusion,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    diff_tuning: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One training batch of the recipe, drawn from `generator` in a fixed order.

    1. target rows: x0 [b_tgt, C, h, w], y [b_tgt] with 10% dropped to the null row,
       t uniform (or toward the noisy end for Diff-Tuning);
    2. Diff-Tuning only: 20% retention rows, null label, t toward the clean end;
    3. random horizontal flips, then noise and x_t = q(x_t | x0).
    Returns x0, y, t, noise, x_t (all on `device`, x0 in fp32 whatever the
    stored dtype) and b_tgt. Only the drawn rows of `data` move to `device`.
    Shared by every method the study compares, so they all see the same batches.
    """
    b_ret = max(1, round(batch_size * RETENTION_FRACTION)) if diff_tuning else 0
    b_tgt = batch_size - b_ret
    g = generator
    idx = torch.randint(0, data.x.shape[0], (b_tgt,), generator=g)
    x0 = _rows(data.x, idx, device)
    y = data.labels[idx].clone()
    y[torch.rand(b_tgt, generator=g) < LABEL_DROPOUT] = data.num_classes
    t = diffusion.sample_timesteps(b_tgt, generator=g, bias="noisy" if diff_tuning else "uniform")
    if b_ret:
        ridx = torch.randint(0, data.retention.shape[0], (b_ret,), generator=g)
        x0 = torch.cat([x0, _rows(data.retention, ridx, device)])
        y = torch.cat([y, torch.full((b_ret,), data.num_classes, dtype=y.dtype)])
        t = torch.cat([t, diffusion.sample_timesteps(b_ret, generator=g, bias="clean")])
    flip = (torch.rand(batch_size, generator=g) < 0.5).to(device)
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    noise = torch.randn(x0.shape, generator=g)
    t, y, noise = t.to(device), y.to(device), noise.to(device, x0.dtype)
    return x0, y, t, noise, diffusion.q_sample(x0, t, noise), b_tgt


def _rows(x: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
    """x[idx] on `device` in fp32, indexed where x lives (a host set never moves whole)."""
    return x[idx.to(x.device)].to(device).float()


@dataclass
class _PendingStep:
    """An optimizer step in progress: its drawn batch and the next micro-batch."""

    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    weights: torch.Tensor  # [B] each row's weight in the step's loss
    size: int  # rows per micro-batch
    start: int = 0
    loss: float = 0.0


def loss_weights(batch_size: int, b_tgt: int, device) -> torch.Tensor:
    """[B] weights w with loss = sum(w * per-sample loss) = mean(target) + 0.1 mean(retention)."""
    w = torch.full((batch_size,), 1.0 / b_tgt, device=device)
    if b_tgt < batch_size:
        w[b_tgt:] = RETENTION_WEIGHT / (batch_size - b_tgt)
    return w


class TrainingRun:
    """One fine-tuning job's state: adapter tensors, optimizer, RNG, progress."""

    def __init__(
        self,
        model: DiffFitDiT,
        diffusion: GaussianDiffusion,
        data: TrainingData,
        request: FinetuneRequest,
        init: dict | None = None,
        checkpoint_every: int = 0,
        microbatch: int = 0,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.request = request
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.dtype == torch.float16:
            # fp16 activations overflow without loss scaling, and a scaler would also
            # skip steps; bf16 has fp32's range at the same memory, on every GPU that
            # serves DiT-XL (A100, H100, L4). Sampling in fp16 still works.
            raise UnsupportedPrecision(
                "fine-tuning on a float16 base is not supported (no loss scaling): run the "
                "worker with DIFFFIT_DTYPE=bfloat16 (same memory, fp32's range) or float32"
            )
        # 0 = the whole batch in one micro-step.
        self.microbatch = microbatch if 0 < microbatch < request.batch_size else request.batch_size
        self._pending: _PendingStep | None = None
        self.future: Future = Future()
        self.cancel = threading.Event()
        self.generator = torch.Generator("cpu").manual_seed(request.seed)
        placement = request.resolved_placement()
        tensors = model.init_adapter(placement, data.num_classes, generator=self.generator)
        if request.class_table == "keep":
            # The paper's 256 -> 512 run: same classes, start from the base's own table.
            tensors[CLASS_TABLE] = model.base_adapter()[CLASS_TABLE].float()
            if data.num_classes != model.base_num_classes:
                raise InvalidDataset(
                    f"class_table keep needs the base's {model.base_num_classes} classes; "
                    f"the data has {data.num_classes}"
                )
        self.params = {k: v.detach().float().to(self.device).requires_grad_(True) for k, v in tensors.items()}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=request.learning_rate, weight_decay=0.0)
        self.ema = {k: v.detach().clone() for k, v in self.params.items()} if request.ema else None
        self.progress = Progress(total=request.steps)
        # Checkpoints are snapshotted on the engine thread at exact multiples of
        # checkpoint_every, so a lost worker redoes at most one interval.
        self.checkpoint_every = checkpoint_every
        self.checkpoint: dict | None = None
        self.checkpoint_ready = threading.Event()
        # Previews: the adapter as it is at every preview_every-th step (step, tensors).
        self.preview_every = request.preview_every or 0
        self.preview: tuple[int, dict[str, torch.Tensor]] | None = None
        self.preview_ready = threading.Event()
        if init is not None:
            self.load_state_dict(init)

    # -- one step --------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """True once every requested optimizer step has run."""
        return self.progress.step >= self.progress.total

    def step(self) -> bool:
        """One whole optimizer step (all its micro-batches); True when the run has finished."""
        while not self.micro_step():
            pass
        return self.finished

    def micro_step(self) -> bool:
        """One micro-batch of the current optimizer step; True when it completed the step.

        The first micro-step of a step draws the whole batch (so the RNG stream, and the
        result, do not depend on the micro-batch size); each one adds its rows' gradient;
        the last one updates the adapter, the EMA and the progress.
        """
        if self.cancel.is_set():
            raise JobCancelled("the job was cancelled")
        if self._pending is None:
            self._pending = self._draw_step()
        p = self._pending
        rows = slice(p.start, p.start + p.size)
        # forward through the frozen base with the live fp32 adapter: [b, 2C, h, w]
        out = self.model(p.x_t[rows].to(self.dtype), p.t[rows], p.y[rows], Route.training(self.params))
        per_sample = self.diffusion.training_losses(
            out.float(), p.x0[rows].float(), p.x_t[rows].float(), p.t[rows], p.noise[rows].float(), VLB_WEIGHT
        )
        loss = (per_sample["loss"] * p.weights[rows]).sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            # Typed, so the engine fails this run's future and goes on serving.
            raise NonFiniteLoss(
                f"the training loss is {value} at step {self.progress.step + 1} (rows "
                f"{rows.start}..{rows.stop - 1} of its batch); lower the learning_rate "
                f"({self.request.learning_rate:g}) or check the data set"
            )
        loss.backward()
        p.loss += value
        p.start += p.size
        if p.start < len(p.t):
            return False
        self._pending = None
        self._finish_step(p.loss)
        return True

    def _draw_step(self) -> _PendingStep:
        diff_tuning = self.request.objective == "diff_tuning" and self.data.retention is not None
        x0, y, t, noise, x_t, b_tgt = draw_batch(
            self.data, self.diffusion, self.request.batch_size, self.generator, self.device, diff_tuning
        )
        self.optimizer.zero_grad(set_to_none=True)
        weights = loss_weights(len(t), b_tgt, self.device)
        return _PendingStep(x0, y, t, noise, x_t, weights, size=self.microbatch)

    def _finish_step(self, loss: float) -> None:
        self.optimizer.step()
        self.progress.step += 1
        if self.ema is not None:
            decay = ema_decay(self.progress.step)
            with torch.no_grad():
                for k, v in self.params.items():
                    self.ema[k].lerp_(v.detach(), 1 - decay)
        self.progress.loss = loss
        self.progress.losses.append(loss)
        # Checkpoints only at step boundaries: no half-accumulated gradient is ever saved.
        if self.checkpoint_every and self.progress.step % self.checkpoint_every == 0 and not self.finished:
            self.checkpoint = self.state_dict()
            self.checkpoint_ready.set()
        if self.preview_every and self.progress.step % self.preview_every == 0:
            source = self.ema if self.ema is not None else self.params
            self.preview = (self.progress.step, {k: v.detach().clone() for k, v in source.items()})
            self.preview_ready.set()

    # -- results and checkpoints -------------------------------------------------
    def result(self) -> dict[str, torch.Tensor]:
        """The trained adapter (the EMA when enabled), detached on CPU."""
        source = self.ema if self.ema is not None else self.params
        return {k: v.detach().cpu().clone() for k, v in source.items()}

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically, as a deep copy on the CPU.

        Taken on the engine thread at a step boundary; the task thread serialises it
        later while the engine keeps stepping, so nothing here may alias live state
        (the optimizer's own state_dict keeps references to its exp_avg tensors).
        """
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "ema": None if self.ema is None else {k: v.detach().cpu().clone() for k, v in self.ema.items()},
            "optimizer": _deep_cpu(self.optimizer.state_dict()),
            "generator": self.generator.get_state().clone(),
            "step": self.progress.step,
            "loss": self.progress.loss,
            "losses": list(self.progress.losses),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            if self.ema is not None and state.get("ema"):
                for k, v in state["ema"].items():
                    self.ema[k].copy_(v.to(self.device))
        # load_state_dict casts the moments to each param's device and dtype (the
        # "step" counters stay as saved); our copy keeps the caller's dict intact.
        self.optimizer.load_state_dict(_deep_cpu(state["optimizer"]))
        self.generator.set_state(state["generator"])
        self.progress.step = int(state["step"])
        self.progress.losses = list(state.get("losses", []))
        self.progress.loss = state.get("loss", self.progress.losses[-1] if self.progress.losses else None)


def _deep_cpu(obj):
    """A copy of nested dicts / lists / tensors with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _deep_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_deep_cpu(v) for v in obj)
    return obj
