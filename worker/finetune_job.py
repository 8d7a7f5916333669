"""The finetune task body: a job from `queued` to a terminal state.

1. Load the job; skip it if already terminal (a redelivery after success),
   fail it if redelivered more than the retry cap (it kills its worker).
2. Intake (worker.intake): download and unpack the data set, then decode
   it chunk by chunk on this thread and encode each chunk with its own
   engine call; the training set stays on the host (a memory-mapped file
   under data_dir/intake when large, deleted when the job ends).
3. Train on the engine thread, resuming from the last checkpoint if any;
   this thread mirrors progress to the registry, checks the cancel flag and
   writes a checkpoint (adapter + optimizer + RNG) every N steps, freeing the
   one it replaces.
4. Finish: adapter file, sample grid and loss curve into the blob store,
   then ONE registry call adds the immutable version; the job succeeds.

Every way out frees the job's checkpoint (`adapters_store.lifecycle.end_job`),
except failure: a failed job keeps its last checkpoint for
DIFFFIT_CHECKPOINT_RETENTION_S, after which `difffit gc` frees it. Running
out of host or device memory (worker.faults) or a NaN/inf loss fails the
job (`out-of-memory`, `non-finite-loss`), never the worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from datetime import UTC, datetime

import torch

from adapters_store import lifecycle
from core.adapter.file import adapter_metadata, save_adapter
from core.adapter.model import count_params
from core.diffusion import GaussianDiffusion
from core.engine.images import grid_png, to_pngs
from core.engine.sampling import SampleRequest
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import TERMINAL_JOB_STATES, FinetuneRequest
from difffit.errors import DiffFitError, EngineDead, InvalidDataset, JobCancelled, JobNotFound
from worker.class_table import to_base_classes
from worker.datasets import ImageSet
from worker.faults import TRAINING_ADVICE, inject_faults, job_fault
from worker.intake import EncodedSet, encode_image_set, intake, intake_file
from worker.previews import PreviewSampler, ProgressEvents

log = logging.getLogger(__name__)
GRID_CLASSES, GRID_PER_CLASS = 16, 4
HEARTBEAT_STALE_S = 5.0


def torch_bytes(obj) -> bytes:
    """torch.save to bytes (checkpoints)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_load_bytes(data: bytes):
    """torch.load from bytes; weights_only: checkpoints hold tensors and plain values."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _now() -> datetime:
    return datetime.now(UTC)


def encode(rt, images: ImageSet) -> TrainingData:
    """Engine thread, one call: decoded images -> host training data (small sets; jobs use intake)."""
    return training_data(encode_image_set(rt, images))


def training_data(encoded: EncodedSet) -> TrainingData:
    return TrainingData(x=encoded.x, labels=torch.from_numpy(encoded.labels), class_names=encoded.class_names)


def run_finetune_job(rt, job_id: str) -> None:
    """Drive one job to succeeded, failed or cancelled; never raises for job errors."""
    reg, settings = rt.registry, rt.settings
    job = reg.get_job_unscoped(job_id)
    if job.state in TERMINAL_JOB_STATES:
        log.info("job %s already %s; nothing to do", job_id, job.state)
        return
    if job.cancel_requested:
        lifecycle.end_job(reg, rt.blobs, job_id, "cancelled", keep_checkpoint=False)
        return
    job = _wait_out_live_owner(reg, job)
    if job.state in TERMINAL_JOB_STATES:
        return
    attempts = job.attempts + 1
    if attempts > settings.max_task_retries + 1:
        _fail(rt, job_id, "worker-lost", f"the job's worker died {job.attempts} times; giving up")
        intake_file(settings, job_id).unlink(missing_ok=True)  # a dead worker's, if on this host
        return
    reg.update_job(job_id, state="running", attempts=attempts, started_at=job.started_at or _now())
    reg.add_job_event(job_id, "running", {"attempt": attempts})
    try:
        _train_and_register(rt, job_id, job)
    except JobCancelled:
        lifecycle.end_job(reg, rt.blobs, job_id, "cancelled", keep_checkpoint=False, event={})
    except EngineDead:
        # Not the job's fault: it stays `running` (its heartbeat stops) and its task
        # goes back to the queue, to resume from its checkpoint on a live worker.
        raise
    except JobNotFound:
        # The job's row is gone (its tenant was purged): nothing to report to.
        log.warning("job %s was deleted while it ran; stopped", job_id)
    except DiffFitError as exc:
        _fail(rt, job_id, exc.code, exc.message)
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:  # a stage job_fault does not name
        log.exception("job %s ran out of memory", job_id)
        _fail(rt, job_id, "out-of-memory", f"out of memory ({type(exc).__name__}: {exc}); {TRAINING_ADVICE}")
    except Exception as exc:  # noqa: BLE001 - a job error must end the job, not the worker
        log.exception("job %s failed", job_id)
        _fail(rt, job_id, "internal", f"{type(exc).__name__}: {exc}")
    finally:
        # However the job ended, its intake file goes (a redelivery rebuilds it).
        intake_file(settings, job_id).unlink(missing_ok=True)


def _wait_out_live_owner(reg, job):
    """A redelivered job whose heartbeat is fresh still has a live worker: wait, don't fork it.

    Redis redelivers unacked tasks after the visibility timeout even when their
    worker is alive. The running worker writes progress every 0.5 s; only when
    that stops for HEARTBEAT_STALE_S is the job taken over (its worker died).
    """
    while job.state == "running" and job.updated_at is not None:
        age = (_now() - _aware(job.updated_at)).total_seconds()
        if age > HEARTBEAT_STALE_S:
            return job
        time.sleep(min(2.0, HEARTBEAT_STALE_S - age + 0.1))
        job = reg.get_job_unscoped(job.id)
    return job


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _fail(rt, job_id: str, code: str, message: str) -> None:
    # The last checkpoint stays for the retention time (0: freed now).
    keep = rt.settings.checkpoint_retention_s > 0
    lifecycle.end_job(
        rt.registry,
        rt.blobs,
        job_id,
        "failed",
        keep_checkpoint=keep,
        event={"code": code, "message": message},
        error_code=code,
        error_message=message,
    )


def _train_and_register(rt, job_id: str, job) -> None:
    reg, settings = rt.registry, rt.settings
    request = FinetuneRequest.model_validate(job.request)
    resolution = request.resolution or rt.base.resolution
    rt.latent_size(resolution)  # validates the resolution

    # 2. intake: host latents, built chunk by chunk
    images = _intake(rt, job, request, resolution)
    if request.class_table == "keep":
        images = to_base_classes(images, rt.base.class_names)
    if len(images.class_names) > settings.max_classes:
        raise InvalidDataset(f"{len(images.class_names)} classes; at most {settings.max_classes} allowed")
    reg.add_job_event(job_id, "dataset", {"images": len(images.labels), "classes": images.class_names})
    data = training_data(images)
    if request.objective == "diff_tuning":
        with job_fault("sampling the retention set", "lower DIFFFIT_MAX_BATCH_SIZE or the job's resolution"):
            data.retention = _retention_set(rt, len(images.labels), rt.latent_size(resolution), request.seed)
        reg.add_job_event(job_id, "retention", {"images": int(data.retention.shape[0])})

    # 3. train, resuming from the last checkpoint
    init = None
    if job.checkpoint_sha256:
        init = torch_load_bytes(rt.blobs.get_bytes(job.checkpoint_sha256))
        reg.add_job_event(job_id, "resumed", {"step": int(init["step"])})
    diffusion = GaussianDiffusion.from_scheduler_config(rt.base.scheduler_config)
    every = request.checkpoint_every or settings.checkpoint_every
    with job_fault("setting up training", TRAINING_ADVICE):
        run = rt.call(
            lambda: TrainingRun(
                rt.engine.model, diffusion, data, request, init, every, microbatch=settings.train_microbatch
            )
        )
    inject_faults(run, settings.test_faults)
    previews = PreviewSampler(rt, job_id, data.num_classes, resolution)
    progress = ProgressEvents(reg, job_id)
    future = rt.engine.submit_training(run)
    checkpoint = job.checkpoint_sha256
    try:
        while True:
            # Wake for a checkpoint at once, else every 0.5 s for progress, previews and cancel.
            if run.checkpoint_ready.wait(timeout=0.5):
                run.checkpoint_ready.clear()
                state = run.checkpoint
                checkpoint = lifecycle.replace_checkpoint(
                    reg, rt.blobs, job_id, torch_bytes(state), state["step"], previous=checkpoint
                )
                reg.add_job_event(job_id, "checkpoint", {"step": state["step"], "sha256": checkpoint})
            previews.poll()
            if run.preview_ready.is_set() and previews.pending is None:
                # The newest snapshot; those taken while one was sampling are skipped.
                run.preview_ready.clear()
                previews.offer(*run.preview)
            if future.done():
                with job_fault(f"training (step {run.progress.step + 1})", TRAINING_ADVICE):
                    tensors = future.result()
                break
            p = run.progress
            current = reg.update_job(job_id, step=p.step, loss=p.loss, eta_s=p.eta_s)
            progress.maybe_send(p)
            if current.cancel_requested:
                run.cancel.set()
        progress.maybe_send(run.progress, force=True)
        previews.poll(wait_s=60.0)
        if run.preview_ready.is_set():  # the newest snapshot (the last step's) is never skipped
            run.preview_ready.clear()
            previews.offer(*run.preview)
            previews.poll(wait_s=60.0)
    except BaseException:
        # Whatever stopped this loop (the job deleted, the registry or store
        # down) must not leave the engine training for nobody.
        run.cancel.set()
        raise
    finally:
        previews.close()

    # 4. finish: blobs first, then one registry write
    placement = request.resolved_placement()
    counts = count_params(tensors)
    meta = adapter_metadata(
        base_model=rt.base.model_id,
        base_hash=rt.base.content_hash,
        method=request.method,
        placement=placement.model_dump(),
        class_names=data.class_names,
        resolution=resolution,
        training={**request.model_dump(), "dataset_images": len(images.labels), "job_id": job_id},
        trainable_params=counts["total"],
    )
    blob = save_adapter(tensors, meta)
    grid = _sample_grid(rt, hashlib.sha256(blob).hexdigest(), tensors, data.num_classes, resolution)
    loss = json.dumps(run.progress.losses).encode()
    # Everything slow happens before the first upload, keeping the window in
    # which these blobs are unreferenced (gc's grace period) short.
    sha, grid_sha, loss_sha = (rt.blobs.put_bytes(b) for b in (blob, grid, loss))
    contents = {sha: blob, grid_sha: grid, loss_sha: loss}
    files = {"samples.png": grid_sha, "loss.json": loss_sha}
    version = reg.add_version(
        job.tenant_id,
        job.adapter_name,
        sha256=sha,
        size_bytes=len(blob),
        method=request.method,
        base_model_hash=rt.base.content_hash,
        class_names=data.class_names,
        resolution=resolution,
        trainable_params=counts["total"],
        metadata=meta,
        files=files,
        job_id=job_id,
    )
    lifecycle.ensure_stored(rt.blobs, contents)
    lifecycle.end_job(
        reg,
        rt.blobs,
        job_id,
        "succeeded",
        keep_checkpoint=False,
        step=run.progress.step,
        loss=run.progress.loss,
        eta_s=0.0,
        adapter_version=version.version,
        event={"adapter": job.adapter_name, "version": version.version},
    )


def _intake(rt, job, request: FinetuneRequest, resolution: int) -> EncodedSet:
    """The job's training set: an uploaded data set (by id, the tenant's own) or a URL."""
    channels, path = rt.base.image_channels, intake_file(rt.settings, job.id)
    if request.dataset_id is not None:
        dataset = rt.registry.get_dataset(job.tenant_id, request.dataset_id)  # gone: dataset-not-found
        return intake(rt, rt.blobs.open_verified(dataset.sha256), channels, resolution, path)
    return intake(rt, request.dataset_url, channels, resolution, path)


def _retention_set(rt, n_target: int, latent_size: int, seed: int) -> torch.Tensor:
    """Diff-Tuning's retention data: base-model samples of random base classes, [R, C, h, w].

    R = a quarter of the target set, clamped to 32..512: the objective draws 20% of
    each batch from it, so it only needs to be varied, not large.
    """
    count = max(32, min(512, n_target // 4))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(rt.base.class_names), (count,), generator=g).tolist()
    # Guidance doubles the rows: each request fits the engine's batch cap (at least one image).
    per_request = max(1, rt.settings.max_batch_size // 2)
    futures = []
    for start in range(0, count, per_request):
        request = SampleRequest(
            request_id=f"retention-{start}",
            adapter_key=None,
            adapter_tensors=None,
            labels=labels[start : start + per_request],
            seed=seed + start,
            steps=25,
            guidance_scale=4.0,
            scheduler_name="ddim",
            latent_size=latent_size,
            return_latents=True,
        )
        futures.append(rt.engine.submit(request))
    return torch.cat([f.result() for f in futures])  # host: training moves the rows it draws


def _sample_grid(rt, sha: str, tensors, num_classes: int, resolution: int) -> bytes:
    """One row per class (up to 16 classes), 4 samples each, DDIM 25 steps, guidance 4."""
    classes = list(range(min(num_classes, GRID_CLASSES)))
    request = SampleRequest(
        request_id=f"grid-{sha[:12]}",
        adapter_key=sha,
        adapter_tensors=tensors,
        labels=[c for c in classes for _ in range(GRID_PER_CLASS)],
        seed=0,
        steps=25,
        guidance_scale=4.0,
        scheduler_name="ddim",
        latent_size=rt.latent_size(resolution),
    )
    pngs = to_pngs(rt.engine.submit(request).result())  # encoded here, off the engine thread
    return grid_png(pngs, columns=GRID_PER_CLASS, scale=2 if resolution < 64 else 1)
