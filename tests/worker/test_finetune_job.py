"""Fine-tuning jobs in one worker runtime: outcome, Diff-Tuning, cancel, retry cap."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
import torch
from PIL import Image

from core.diffusion import GaussianDiffusion
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import FinetuneRequest
from difffit.errors import AdapterNotFound
from tests.e2e.conftest import class_folder_zip


def _job(rt, tmp_path, **request):
    tenant = rt.registry.create_tenant("acme")
    url = class_folder_zip(tmp_path / "ds.zip", ["dark", "light"], per_class=6).as_uri()
    body = {"dataset_url": url, "adapter": "shades", "steps": 8, "batch_size": 8, **request}
    job, _ = rt.registry.create_job(tenant.id, "shades", body, total_steps=body["steps"])
    return tenant, job


def test_job_registers_a_version_with_grid_loss_curve_and_counts(runtime, tmp_path):
    tenant, job = _job(runtime, tmp_path, ema=True)
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "succeeded" and job.adapter_version == 1 and job.step == 8
    v = runtime.registry.get_version(tenant.id, "shades")
    assert v.class_names == ["dark", "light"] and v.metadata["training"]["ema"] is True
    grid = Image.open(io.BytesIO(runtime.blobs.get_bytes(v.files["samples.png"])))
    assert grid.size == (4 * 8 * 2, 2 * 8 * 2)  # 4 samples x 2 classes, 8 px, upscaled x2
    assert len(json.loads(runtime.blobs.get_bytes(v.files["loss.json"]))) == 8
    tensors, meta = runtime.adapter(v.sha256)
    assert v.trainable_params == sum(t.numel() for t in tensors.values()) == meta["trainable_params"]
    kinds = [e.kind for e in runtime.registry.job_events(job.id)]
    assert kinds[0] == "running" and kinds[-1] == "succeeded" and "dataset" in kinds


def test_previews_and_progress_events_follow_the_run(runtime, tmp_path):
    tenant, job = _job(runtime, tmp_path, preview_every=4)
    runtime.finetune(job.id)
    assert runtime.registry.get_job_unscoped(job.id).state == "succeeded"
    events = runtime.registry.job_events(job.id)
    previews = [e.data for e in events if e.kind == "preview"]
    # One preview in flight at a time: step 4's may be skipped, the last step's never is.
    assert previews and previews[-1]["step"] == 8 and {p["step"] for p in previews} <= {4, 8}
    grid = Image.open(io.BytesIO(runtime.blobs.get_bytes(previews[-1]["sha256"])))
    assert grid.size == (2 * 8 * 2, 2 * 8 * 2)  # 2 samples x 2 classes, 8 px, upscaled x2
    assert previews[-1]["url"] == f"/jobs/{job.id}/previews/{previews[-1]['sha256']}"
    progress = [e.data for e in events if e.kind == "progress"]
    assert sum(len(p["losses"]) for p in progress) == 8 and progress[-1]["step"] == 8
    engine = runtime.engine
    assert not engine.call(
        lambda: any(engine.bank.resident(f"preview-{job.id}-{s}") for s in (4, 8))
    ).result()


def test_diff_tuning_job_builds_a_retention_set(runtime, tmp_path):
    tenant, job = _job(runtime, tmp_path, objective="diff_tuning", method="bitfit")
    runtime.finetune(job.id)
    assert runtime.registry.get_job_unscoped(job.id).state == "succeeded"
    events = {e.kind: e.data for e in runtime.registry.job_events(job.id)}
    assert events["retention"]["images"] == 32
    assert runtime.registry.get_version(tenant.id, "shades").method == "bitfit"


def test_diff_tuning_batches_mix_target_and_retention(tiny_base):
    from core.adapter.model import DiffFitDiT
    from core.base_model import load_base

    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=2, max_classes=10)
    diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
    data = TrainingData(torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,)), ["a", "b", "c"])
    data.retention = torch.randn(10, 1, 8, 8)
    request = FinetuneRequest(dataset_url="x", adapter="a", steps=5, batch_size=10, objective="diff_tuning")
    run = TrainingRun(model, diffusion, data, request)
    calls, labels = [], []
    sample = diffusion.sample_timesteps
    diffusion.sample_timesteps = lambda b, generator=None, bias="uniform": (
        calls.append((b, bias)) or sample(b, generator=generator, bias=bias)
    )
    forward = model.forward
    model.forward = lambda x, t, y, route: labels.append(y.clone()) or forward(x, t, y, route)
    with torch.enable_grad():
        run.step()
    assert calls == [(8, "noisy"), (2, "clean")]
    assert labels[0][8:].tolist() == [3, 3]  # retention rows carry the null label


def test_cancel_stops_the_job_and_writes_no_adapter(runtime, tmp_path):
    tenant, job = _job(runtime, tmp_path, steps=100000, batch_size=4)
    worker = threading.Thread(target=runtime.finetune, args=(job.id,))
    worker.start()
    deadline = time.monotonic() + 60
    while runtime.registry.get_job_unscoped(job.id).step < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    runtime.registry.request_cancel(tenant.id, job.id)
    worker.join(30)
    assert not worker.is_alive()
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "cancelled" and 3 <= job.step < 100000
    with pytest.raises(AdapterNotFound):
        runtime.registry.get_adapter(tenant.id, "shades")


def test_a_job_that_keeps_killing_its_worker_fails_after_the_retry_cap(runtime, tmp_path):
    _, job = _job(runtime, tmp_path)
    runtime.registry.update_job(job.id, attempts=runtime.settings.max_task_retries + 1)
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "failed" and job.error_code == "worker-lost"
    assert "died 4 times" in job.error_message


def test_checkpoints_go_with_the_job_and_the_adapter_with_its_delete(runtime, tmp_path):
    from adapters_store import lifecycle
    from tests.s3 import everything_in

    tenant, job = _job(runtime, tmp_path, steps=12, checkpoint_every=4)
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "succeeded" and job.checkpoint_sha256 is None
    checkpoints = [e.data["sha256"] for e in runtime.registry.job_events(job.id) if e.kind == "checkpoint"]
    assert checkpoints and not any(runtime.blobs.exists(s) for s in checkpoints)
    v = runtime.registry.get_version(tenant.id, "shades")
    assert sorted(everything_in(runtime.blobs)) == sorted(
        f"{s[:2]}/{s[2:4]}/{s}" for s in (v.sha256, *v.files.values())
    )
    lifecycle.delete_adapter(runtime.registry, runtime.blobs, tenant.id, "shades")
    assert everything_in(runtime.blobs) == []


def test_a_failed_job_keeps_its_last_checkpoint(runtime, tmp_path):
    _, job = _job(runtime, tmp_path)
    sha = runtime.blobs.put_bytes(b"checkpoint written before the worker died")
    runtime.registry.update_job(job.id, checkpoint_sha256=sha, checkpoint_step=4)
    runtime.registry.update_job(job.id, attempts=runtime.settings.max_task_retries + 1)
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "failed" and job.checkpoint_sha256 == sha and runtime.blobs.exists(sha)
