"""Issue 14: bounded intake, resource faults as job faults, retention within the batch cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import worker.datasets as datasets
import worker.intake as intake_mod
from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.engine import Engine
from core.engine.images import to_pngs
from core.engine.sampling import SampleRequest
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import FinetuneRequest
from difffit.errors import NonFiniteLoss
from difffit.settings import Settings
from tests.e2e.conftest import class_folder_zip
from worker.datasets import load_dataset
from worker.intake import HostRows, encode_image_set, intake, intake_file
from worker.runtime import Runtime


def _runtime(base: str, tmp_path, **settings) -> Runtime:
    return Runtime(
        Settings(
            data_dir=tmp_path / "data",
            base_model=base,
            adapter_slots=3,
            max_classes=10,
            allow_file_urls=True,
            **settings,
        )
    )


@pytest.fixture
def runtime(tiny_base, tmp_path):
    # chunks of 4 images and every training set in a file: the large-set path at test scale
    rt = _runtime(tiny_base, tmp_path, intake_chunk=4, intake_memmap_mb=0)
    yield rt
    rt.engine.stop()


def _job(rt, tmp_path, per_class=6, **request):
    tenant = rt.registry.create_tenant("acme")
    url = class_folder_zip(tmp_path / "ds.zip", ["dark", "light", "mid"], per_class=per_class).as_uri()
    body = {"dataset_url": url, "adapter": "shades", "steps": 4, "batch_size": 8, **request}
    job, _ = rt.registry.create_job(tenant.id, "shades", body, total_steps=body["steps"])
    return job


def _base_sample_works(rt) -> None:
    request = SampleRequest("after", None, None, [1, 2], 0, 4, 2.0, "ddim", rt.latent_size(None))
    pngs = to_pngs(rt.engine.submit(request).result(timeout=60))
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)


@pytest.mark.parametrize("vae", [False, True])
def test_chunked_intake_equals_the_one_shot_reference(tiny_base, tiny_vae_base, tmp_path, vae):
    rt = _runtime(tiny_vae_base if vae else tiny_base, tmp_path, intake_chunk=5, intake_memmap_mb=0)
    try:
        calls = []
        call = rt.call
        rt.call = lambda fn: calls.append(fn) or call(fn)
        url = class_folder_zip(tmp_path / "ds.zip", ["a", "b", "c"], per_class=7).as_uri()  # 21 = 4x5 + 1
        size, channels = rt.base.resolution, rt.base.image_channels
        path = intake_file(rt.settings, "job-1")
        got = intake(rt, url, channels, size, path)
        assert len(calls) == 5  # one engine call per chunk of at most 5 images
        assert path.is_file() and isinstance(got.x, torch.Tensor)  # memory-mapped from the file
        assert np.load(path, mmap_mode="r").shape == tuple(got.x.shape)

        images = load_dataset(url, rt.settings, channels, size)
        reference = call(lambda: encode_image_set(rt, images))
        assert got.x.dtype == rt.base.transformer.dtype and got.x.shape[0] == 21
        assert got.class_names == reference.class_names == ["a", "b", "c"]
        assert np.array_equal(got.labels, reference.labels)
        if vae:  # another VAE batch split may round differently in the last bits
            torch.testing.assert_close(got.x, reference.x, rtol=1e-5, atol=1e-5)
        else:  # a pixel-space base keeps its pixels: exactly the same rows
            assert torch.equal(got.x, reference.x)
    finally:
        rt.engine.stop()


def test_host_rows_keep_bf16_bits_in_the_file_and_small_sets_in_ram(tmp_path):
    x = torch.randn(10, 2, 3, 3).to(torch.bfloat16)
    on_file = HostRows(10, 0, tmp_path / "x.npy")
    in_ram = HostRows(10, 1 << 20, tmp_path / "y.npy")
    for rows in (on_file, in_ram):
        for part in x.split(4):
            rows.append(part)
    assert torch.equal(on_file.finish(), x) and torch.equal(in_ram.finish(), x)
    assert (tmp_path / "x.npy").is_file() and not (tmp_path / "y.npy").exists()


def test_the_intake_file_is_used_for_training_and_removed_when_the_job_ends(runtime, tmp_path):
    ok = _job(runtime, tmp_path)
    runtime.finetune(ok.id)
    assert runtime.registry.get_job_unscoped(ok.id).state == "succeeded"
    assert not intake_file(runtime.settings, ok.id).exists()


def test_a_job_that_fails_in_training_removes_its_intake_file(tiny_base, tmp_path):
    # The fault fires only if the job's intake file exists while it trains.
    rt = _runtime(tiny_base, tmp_path, intake_chunk=4, intake_memmap_mb=0)
    try:
        job = _job(rt, tmp_path)
        path = intake_file(rt.settings, job.id)
        rt.settings = rt.settings.model_copy(update={"test_faults": f"oom-when-exists:{path}"})
        rt.finetune(job.id)
        job = rt.registry.get_job_unscoped(job.id)
        assert job.state == "failed" and job.error_code == "out-of-memory"
        assert "training (step 1)" in job.error_message and "DIFFFIT_TRAIN_MICROBATCH" in job.error_message
        assert not path.exists()
        _base_sample_works(rt)
    finally:
        rt.engine.stop()


def test_a_bad_file_after_the_first_chunks_fails_the_job_and_removes_its_file(runtime, tmp_path):
    job = _job(runtime, tmp_path, per_class=6)
    real = datasets.load_image
    seen = []

    def load_image(path, channels, size):
        seen.append(path)
        if len(seen) == 11:  # chunk 3 of 4-image chunks: two chunks are already in the file
            assert intake_file(runtime.settings, job.id).is_file()
            raise OSError("truncated")
        return real(path, channels, size)

    datasets.load_image = load_image
    try:
        runtime.finetune(job.id)
    finally:
        datasets.load_image = real
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "failed" and job.error_code == "invalid-dataset"
    assert "1 files could not be read as images: light/4.png (corrupt image: OSError)" in job.error_message
    assert not intake_file(runtime.settings, job.id).exists()


def test_host_memory_error_in_decoding_is_an_out_of_memory_job_fault(runtime, tmp_path, monkeypatch):
    job = _job(runtime, tmp_path)

    def exhausted(path, channels, size):
        raise MemoryError()

    monkeypatch.setattr(datasets, "load_image", exhausted)
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "failed" and job.error_code == "out-of-memory"
    assert "out of host memory while decoding the data set" in job.error_message
    assert "DIFFFIT_INTAKE_CHUNK" in job.error_message
    _base_sample_works(runtime)


def test_device_out_of_memory_in_encoding_is_an_out_of_memory_job_fault(runtime, tmp_path, monkeypatch):
    job = _job(runtime, tmp_path)

    def exhausted(base, pixels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(intake_mod, "encode_pixels", exhausted)
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "failed" and job.error_code == "out-of-memory"
    assert job.error_message.startswith("out of device memory while encoding the data set (CUDA out of")
    _base_sample_works(runtime)


def test_a_non_finite_loss_fails_the_job_naming_step_and_value(runtime, tmp_path, monkeypatch):
    job = _job(runtime, tmp_path)
    monkeypatch.setattr(
        intake_mod, "encode_pixels", lambda base, pixels: torch.full(pixels.shape, float("inf"))
    )
    runtime.finetune(job.id)
    job = runtime.registry.get_job_unscoped(job.id)
    assert job.state == "failed" and job.error_code == "non-finite-loss"
    assert "at step 1" in job.error_message and ("nan" in job.error_message or "inf" in job.error_message)
    assert "learning_rate" in job.error_message
    _base_sample_works(runtime)


def test_the_engine_hands_a_non_finite_loss_to_the_run_and_keeps_sampling(tiny_base):
    base = load_base(tiny_base)
    engine = Engine(base, slots=2, max_classes=10).start()
    try:
        diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
        # Rows far beyond the data's range: the loss overflows at the first step.
        data = TrainingData(torch.full((16, 1, 8, 8), 3e38), torch.randint(0, 2, (16,)), ["a", "b"])
        request = FinetuneRequest(dataset_url="x", adapter="a", steps=5, batch_size=8)
        run = engine.call(lambda: TrainingRun(engine.model, diffusion, data, request)).result()
        with pytest.raises(NonFiniteLoss) as caught:
            engine.submit_training(run).result(timeout=120)
        assert caught.value.code == "non-finite-loss" and "at step 1 " in caught.value.message
        assert engine.alive
        sample = SampleRequest("s", None, None, [0, 1], 0, 4, 2.0, "ddim", 8)
        assert len(engine.submit(sample).result(timeout=60)) == 2
    finally:
        engine.stop()


def test_retention_requests_stay_within_the_batch_cap(tiny_base, tmp_path):
    rt = _runtime(tiny_base, tmp_path, max_batch_size=12)
    try:
        rows = []
        submit = rt.engine.submit
        rt.engine.submit = lambda request: rows.append(request.rows) or submit(request)
        job = _job(rt, tmp_path, objective="diff_tuning", steps=2)
        rt.finetune(job.id)
        assert rt.registry.get_job_unscoped(job.id).state == "succeeded"
        retention = rows[:-1]  # the last request is the sample grid
        assert sum(r // 2 for r in retention) == 32 and max(retention) <= 12
    finally:
        rt.engine.stop()


def test_file_names_follow_class_files_order_without_pathlib(tmp_path):
    folder = tmp_path / "top" / "cls"
    for name in ["b.png", "a-c.png", "a/b.png", "a/.hidden.png", ".x/y.png", "A.png", "10.png", "9.png"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    expected = [str(p.relative_to(tmp_path)) for p in datasets.class_files(folder)]
    assert datasets._file_names(folder, tmp_path) == expected
