"""Sampling requests and one batched denoising step over many of them.

Each request keeps its own diffusers scheduler, generator, latents and step
index, so requests at different steps, with different adapters, classes,
seeds, schedulers and guidance scales share one forward (DiT takes one
timestep per sample). Guidance follows diffusers' DiTPipeline: the cond and
null rows run in the same forward, guidance applies to all latent channels,
and the learned-sigma half is dropped except for DDPM, which uses it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from core.adapter.layers import Route
from core.adapter.model import DiffFitDiT
from difffit.errors import InvalidRequest


def make_scheduler(name: str, base_config: dict, steps: int):
    """A fresh diffusers scheduler for one request, with `steps` inference steps.

    ddim: DDIMScheduler (eta 0); dpm++: DPMSolverMultistepScheduler with
    algorithm dpmsolver++; ddpm: DDPMScheduler with the learned variance
    (variance_type learned_range, fed the model's variance half).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.pop("variance_type", None)
    if name == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    elif name == "dpm++":
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    elif name == "ddpm":
        scheduler = DDPMScheduler.from_config(config, variance_type="learned_range")
    else:
        raise InvalidRequest(f"scheduler must be one of 'ddim', 'dpm++', 'ddpm'; got {name!r}")
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass(eq=False)
class SampleRequest:
    """One generate request (n images) as the engine thread sees it.

    latents: [n, C, h, w] on the device; labels: [n] in the adapter's space.
    A cancelled future (the caller timed out or went away) leaves the batch at
    the next step boundary, freeing its rows and slot.
    """

    request_id: str
    adapter_key: str | None  # content sha256 of the adapter, None = base
    adapter_tensors: dict[str, torch.Tensor] | None
    labels: list[int]
    seed: int
    steps: int
    guidance_scale: float
    scheduler_name: str
    latent_size: int
    return_latents: bool = False  # resolve to latents [n, C, h, w] on CPU instead of images
    #: Who asked: waiting requests are admitted round-robin across tenants (None is one tenant).
    tenant: str | None = None
    #: Resolves to the decoded images, float [n, C, H, W] in [-1, 1] on the CPU (PNG encoding
    #: is the caller's, off the engine thread). Cancelling it drops the request from the batch.
    future: Future = field(default_factory=Future)
    # filled in by the engine
    slot: int = -1
    null_label: int = -1
    scheduler: object = None
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None
    step_index: int = 0
    enqueued_at: float = field(default_factory=time.perf_counter)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def rows(self) -> int:
        """Forward rows this request needs per step (doubled by guidance)."""
        return self.n * (2 if self.guidance_scale > 1 else 1)

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.scheduler.timesteps)

    def start(self, base_config: dict, channels: int, device: torch.device, dtype: torch.dtype) -> None:
        """Draw the initial noise from the request's own seed (on CPU: device independent)."""
        self.scheduler = make_scheduler(self.scheduler_name, base_config, self.steps)
        self.generator = torch.Generator("cpu").manual_seed(self.seed)
        shape = (self.n, channels, self.latent_size, self.latent_size)
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.latents = (noise * self.scheduler.init_noise_sigma).to(device=device, dtype=dtype)


@torch.no_grad()
def denoise_step(model: DiffFitDiT, requests: list[SampleRequest], learned_sigma: bool) -> None:
    """Advance every request one step with a single forward of the model.

    1. Gather rows: per request its n cond rows, then n null rows if guided.
    2. One forward over all rows with per-sample slots and timesteps.
    3. Per request: guidance on eps, keep the cond half's variance.
    4. Per request: its own scheduler steps its latents.
    """
    device = requests[0].latents.device
    channels = requests[0].latents.shape[1]
    # 1. rows: x [M, C, h, w], t [M], y [M], slots [M]
    xs, ts, ys, slots = [], [], [], []
    for r in requests:
        t = r.scheduler.timesteps[r.step_index]
        x = r.scheduler.scale_model_input(r.latents, t)
        guided = r.guidance_scale > 1
        xs.append(torch.cat([x, x]) if guided else x)
        ts += [int(t)] * r.rows
        ys += r.labels + ([r.null_label] * r.n if guided else [])
        slots += [r.slot] * r.rows
    x = torch.cat(xs)
    t = torch.tensor(ts, device=device)
    y = torch.tensor(ys, device=device)

    # 2. forward: [M, C_out, h, w]
    out = model(x, t, y, Route.mixed(slots, device=device))

    # 3.-4. guidance and scheduler step per request
    offset = 0
    for r in requests:
        chunk = out[offset : offset + r.rows]
        offset += r.rows
        eps, rest = chunk[:, :channels], chunk[:, channels:]
        if r.guidance_scale > 1:
            cond, uncond = eps[: r.n], eps[r.n :]
            eps = uncond + r.guidance_scale * (cond - uncond)
            rest = rest[: r.n]
        use_variance = learned_sigma and r.scheduler_name == "ddpm"
        model_output = torch.cat([eps, rest], dim=1) if use_variance else eps
        t = r.scheduler.timesteps[r.step_index]
        kwargs = {"generator": r.generator} if r.scheduler_name == "ddpm" else {}
        r.latents = r.scheduler.step(model_output, t, r.latents, **kwargs).prev_sample
        r.step_index += 1
        r.batch_sizes.append(len(ys))
