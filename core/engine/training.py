"""A fine-tuning run the engine thread steps, on the resident base.

The job's adapter is a dict of live fp32 tensors that require grad; the
frozen base is shared with sampling (no second copy). One :meth:`step` is
one optimizer step of the DiT hybrid loss (L_simple + lambda L_vlb with the
learned variance, lambda = 0.001 on L_vlb, i.e. weight 1.0 on the per-step
vb term as DiT trains), with 10% label dropout to the adapter's null row,
random horizontal flips and AdamW (weight decay 0).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from core.adapter.layers import Route
from core.adapter.model import DiffFitDiT
from core.diffusion import GaussianDiffusion
from difffit.contract import FinetuneRequest
from difffit.errors import JobCancelled

LABEL_DROPOUT = 0.1
VLB_WEIGHT = 1.0  # on the per-step vb term == lambda 0.001 on L_vlb (T = 1000)
# Diff-Tuning (Zhong et al. 2024, as coded in thuml/Diffusion-Tuning): 20% of each
# batch is retention data, its loss weighted 0.1; target t biased to the noisy end,
# retention t to the clean end; retention samples carry the null label.
RETENTION_FRACTION = 0.2
RETENTION_WEIGHT = 0.1


@dataclass
class TrainingData:
    """A decoded data set on the device: x [N, C, h, w] (latents if a VAE), labels [N].

    retention [R, C, h, w]: samples of the base model, for the Diff-Tuning objective.
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
    Returns x0, y, t, noise, x_t (all on `device`) and b_tgt. Shared by every
    method the study compares, so they all see the same batches.
    """
    b_ret = max(1, round(batch_size * RETENTION_FRACTION)) if diff_tuning else 0
    b_tgt = batch_size - b_ret
    g = generator
    idx = torch.randint(0, data.x.shape[0], (b_tgt,), generator=g)
    x0 = data.x[idx.to(device)]
    y = data.labels[idx].clone()
    y[torch.rand(b_tgt, generator=g) < LABEL_DROPOUT] = data.num_classes
    t = diffusion.sample_timesteps(b_tgt, generator=g, bias="noisy" if diff_tuning else "uniform")
    if b_ret:
        ridx = torch.randint(0, data.retention.shape[0], (b_ret,), generator=g)
        x0 = torch.cat([x0, data.retention[ridx.to(device)]])
        y = torch.cat([y, torch.full((b_ret,), data.num_classes, dtype=y.dtype)])
        t = torch.cat([t, diffusion.sample_timesteps(b_ret, generator=g, bias="clean")])
    flip = (torch.rand(batch_size, generator=g) < 0.5).to(device)
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    noise = torch.randn(x0.shape, generator=g)
    t, y, noise = t.to(device), y.to(device), noise.to(device, x0.dtype)
    return x0, y, t, noise, diffusion.q_sample(x0, t, noise), b_tgt


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
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.request = request
        self.device = data.x.device
        self.dtype = next(model.parameters()).dtype
        self.future: Future = Future()
        self.cancel = threading.Event()
        self.generator = torch.Generator("cpu").manual_seed(request.seed)
        placement = request.resolved_placement()
        tensors = model.init_adapter(placement, data.num_classes, generator=self.generator)
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
    def step(self) -> bool:
        """One optimizer step; returns True when the run has finished all steps."""
        if self.cancel.is_set():
            raise JobCancelled("the job was cancelled")
        diff_tuning = self.request.objective == "diff_tuning" and self.data.retention is not None
        x0, y, t, noise, x_t, b_tgt = draw_batch(
            self.data, self.diffusion, self.request.batch_size, self.generator, self.device, diff_tuning
        )
        # 3. forward through the frozen base with the live adapter: [b, 2C, h, w]
        live = {k: v.to(self.dtype) for k, v in self.params.items()}
        out = self.model(x_t.to(self.dtype), t, y, Route.training(live)).float()
        per_sample = self.diffusion.training_losses(
            out, x0.float(), x_t.float(), t, noise.float(), VLB_WEIGHT
        )
        losses = per_sample["loss"]
        loss = losses[:b_tgt].mean()
        if b_tgt < len(losses):
            loss = loss + RETENTION_WEIGHT * losses[b_tgt:].mean()
        # 4. update
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.params.items():
                    self.ema[k].lerp_(v.detach(), 1 - 0.999)
        self.progress.step += 1
        self.progress.loss = float(loss.detach())
        self.progress.losses.append(self.progress.loss)
        done = self.progress.step >= self.progress.total
        if self.checkpoint_every and self.progress.step % self.checkpoint_every == 0 and not done:
            self.checkpoint = self.state_dict()
            self.checkpoint_ready.set()
        if self.preview_every and self.progress.step % self.preview_every == 0:
            source = self.ema if self.ema is not None else self.params
            self.preview = (self.progress.step, {k: v.detach().clone() for k, v in source.items()})
            self.preview_ready.set()
        return done

    # -- results and checkpoints -------------------------------------------------
    def result(self) -> dict[str, torch.Tensor]:
        """The trained adapter (the EMA when enabled), detached on CPU."""
        source = self.ema if self.ema is not None else self.params
        return {k: v.detach().cpu().clone() for k, v in source.items()}

    def state_dict(self) -> dict:
        """Everything needed to resume: adapter, EMA, optimizer, RNG, progress."""
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "ema": None if self.ema is None else {k: v.cpu().clone() for k, v in self.ema.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.progress.step,
            "losses": list(self.progress.losses),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            if self.ema is not None and state.get("ema"):
                for k, v in state["ema"].items():
                    self.ema[k].copy_(v.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.progress.step = int(state["step"])
        self.progress.losses = list(state.get("losses", []))
