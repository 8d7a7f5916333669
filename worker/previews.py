"""Preview grids while a job trains, and progress events for the job's stream.

Every ``preview_every`` steps the engine snapshots the adapter being trained
(the EMA when enabled) at that exact step (:class:`TrainingRun`); the job
thread samples a small grid with it (up to 4 classes x 2 samples, DDIM 10
steps: a few forwards, interleaved with training like any request), stores
the PNG as a blob and appends a ``preview`` event ``{"step", "sha256",
"url"}``. One preview is in flight at a time: snapshots taken while one is
sampling are replaced by newer ones, and the newest (the last step's) is
always drawn before the job ends. The slot the snapshot used
is released once its grid is done, so previews never crowd out tenants'
adapters in the bank.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from core.engine.images import grid_png, to_pngs
from core.engine.sampling import SampleRequest

log = logging.getLogger(__name__)

PREVIEW_CLASSES, PREVIEW_PER_CLASS, PREVIEW_STEPS = 4, 2, 10


@dataclass
class PendingPreview:
    step: int
    key: str
    future: Future


class PreviewSampler:
    """Turns a run's preview snapshots into ``preview`` events (job thread side)."""

    def __init__(self, rt, job_id: str, num_classes: int, resolution: int):
        self.rt, self.job_id = rt, job_id
        self.num_classes, self.resolution = num_classes, resolution
        self.pending: PendingPreview | None = None

    def offer(self, step: int, tensors: dict) -> None:
        """Start sampling a snapshot unless one is still in flight."""
        if self.pending is not None:
            return
        key = f"preview-{self.job_id}-{step}"
        classes = list(range(min(self.num_classes, PREVIEW_CLASSES)))
        request = SampleRequest(
            request_id=key,
            adapter_key=key,
            adapter_tensors=tensors,
            labels=[c for c in classes for _ in range(PREVIEW_PER_CLASS)],
            seed=0,
            steps=PREVIEW_STEPS,
            guidance_scale=4.0,
            scheduler_name="ddim",
            latent_size=self.rt.latent_size(self.resolution),
        )
        self.pending = PendingPreview(step, key, self.rt.engine.submit(request))

    def poll(self, wait_s: float = 0.0) -> None:
        """Publish the pending preview if its images are ready (waiting up to `wait_s`)."""
        pending = self.pending
        if pending is None:
            return
        if not pending.future.done():
            if wait_s <= 0:
                return
            with contextlib.suppress(Exception):  # a failure is reported below
                pending.future.result(timeout=wait_s)
            if not pending.future.done():
                return
        self.pending = None
        self._release(pending.key)
        try:
            pngs = to_pngs(pending.future.result())
        except Exception as exc:  # noqa: BLE001 - a preview is best effort; the job goes on
            log.warning("preview at step %d of job %s failed: %s", pending.step, self.job_id, exc)
            return
        scale = 2 if self.resolution < 64 else 1
        sha = self.rt.blobs.put_bytes(grid_png(pngs, columns=PREVIEW_PER_CLASS, scale=scale))
        self.rt.registry.add_job_event(
            self.job_id,
            "preview",
            {"step": pending.step, "sha256": sha, "url": f"/jobs/{self.job_id}/previews/{sha}"},
        )

    def close(self) -> None:
        """Release a preview still in flight (the job ended)."""
        if self.pending is not None:
            self._release(self.pending.key)
            self.pending = None

    def _release(self, key: str) -> None:
        engine = self.rt.engine
        engine.call(lambda: engine.bank.forget(key))


class ProgressEvents:
    """``progress`` events {step, total, loss, eta_s, losses since the last one}, throttled.

    At most one a second for the first minute, then one every 5 s, so a long
    job's event log stays small while a short one still draws a smooth curve.
    """

    def __init__(self, registry, job_id: str):
        self.registry, self.job_id = registry, job_id
        self.sent_losses = 0
        self.last_sent = 0.0
        self.started = time.monotonic()

    def maybe_send(self, progress, force: bool = False) -> None:
        now = time.monotonic()
        interval = 1.0 if now - self.started < 60 else 5.0
        if len(progress.losses) <= self.sent_losses or (not force and now - self.last_sent < interval):
            return
        losses = progress.losses[self.sent_losses :]
        self.sent_losses += len(losses)
        self.last_sent = now
        self.registry.add_job_event(
            self.job_id,
            "progress",
            {
                "step": progress.step,
                "total": progress.total,
                "loss": progress.loss,
                "eta_s": progress.eta_s,
                "losses": [round(x, 6) for x in losses],
            },
        )
