"""DiT-XL/2-shaped, end to end in bf16 on the CPU (issue 13).

The base is DiT-XL/2's real diffusers config (1152 wide, 16 heads x 72,
patch 2, 4 -> 8 channels, 1000 classes, adaLN-Zero) cut to one block, and
an AutoencoderKL of sd-vae-ft-ema's config, both with random weights built
offline (core/xl_configs.py). Through one worker runtime: intake of a small
RGB data set at 256 px (zip -> decode -> resize -> VAE encode), a few
micro-batched fine-tune steps of two adapters, a mixed batch of the two
adapters plus the base at 256 px in one forward, and a 512 px request.
The VAE (force_upcast) dominates the time: about a minute on 2 idle cores.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.adapter.file import adapter_metadata, save_adapter
from core.diffusion import GaussianDiffusion
from core.engine.images import to_pngs
from core.engine.sampling import SampleRequest
from core.engine.training import TrainingRun
from core.xl_configs import xl_base
from difffit.contract import AdapterRef, FinetuneRequest, GenerateTask
from difffit.settings import Settings
from worker.datasets import load_dataset
from worker.finetune_job import encode
from worker.runtime import Runtime


def _rgb_zip(path, classes=("red", "blue"), per_class=1, size=48):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for c, name in enumerate(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[..., 0 if c == 0 else 2] += 180
                buf = io.BytesIO()
                Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
                zf.writestr(f"{name}/{i}.png", buf.getvalue())
    return path


@pytest.fixture(scope="module")
def xl_runtime(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xl")
    base = xl_base(num_layers=1, dtype=torch.bfloat16)
    settings = Settings(
        data_dir=tmp, adapter_slots=4, max_batch_size=16, allow_file_urls=True, dtype="bfloat16"
    )
    rt = Runtime(settings, base=base)
    yield rt, tmp
    rt.engine.stop()


def _register(rt, tenant_id, name, tensors, resolution=256):
    meta = adapter_metadata(
        base_model=rt.base.model_id, base_hash=rt.base.content_hash, method="difffit",
        placement={}, class_names=["red", "blue"], resolution=resolution,
    )  # fmt: skip
    blob = save_adapter(tensors, meta)
    sha = rt.blobs.put_bytes(blob)
    v = rt.registry.add_version(
        tenant_id, name, sha256=sha, size_bytes=len(blob), method="difffit",
        base_model_hash=rt.base.content_hash, class_names=["red", "blue"], resolution=resolution,
        trainable_params=1, metadata=meta,
    )  # fmt: skip
    return AdapterRef(name=name, version=v.version, sha256=sha, tenant_id=tenant_id)


def _png_size(b64: str) -> tuple[int, int, str]:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    return (*img.size, img.mode)


def test_xl_shaped_bf16_intake_fine_tune_mixed_batch_and_512(xl_runtime):
    rt, tmp = xl_runtime
    assert rt.base.transformer.dtype == torch.bfloat16
    assert rt.base.vae.dtype == torch.float32  # the VAE's config asks for force_upcast

    # 1. intake at 256 px through the VAE: [2, 4, 32, 32] latents
    url = _rgb_zip(tmp / "rgb.zip").as_uri()
    images = load_dataset(url, rt.settings, rt.base.image_channels, 256)
    data = rt.call(lambda: encode(rt, images))
    assert tuple(data.x.shape) == (2, 4, 32, 32) and torch.isfinite(data.x).all()

    # 2. a few micro-batched steps, two adapters (DiffFit, BitFit) on the resident bf16 base
    diffusion = GaussianDiffusion.from_scheduler_config(rt.base.scheduler_config)
    runs = {}
    for method in ("difffit", "bitfit"):
        req = FinetuneRequest(dataset_url=url, adapter=method, method=method, steps=2, batch_size=2)
        run = rt.call(lambda req=req: TrainingRun(rt.engine.model, diffusion, data, req, microbatch=1))
        runs[method] = rt.engine.submit_training(run).result(timeout=600), run
    tensors, run = runs["difffit"]
    assert run.progress.step == 2 and all(np.isfinite(run.progress.losses))
    gammas = torch.cat([v.flatten() for k, v in tensors.items() if k.endswith(".gamma")])
    assert gammas.dtype == torch.float32 and 0 < (gammas - 1).abs().max() < 2**-8

    # 3. two adapters and the base at 256 px in one forward
    tenant = rt.registry.create_tenant("xl")
    refs = [_register(rt, tenant.id, m, runs[m][0]) for m in ("difffit", "bitfit")] + [None]
    gate = threading.Event()
    rt.engine.call(lambda: gate.wait(600))  # hold the engine until all three are queued
    results: dict = {}

    def generate(i, ref):
        task = GenerateTask(request_id=f"xl-{i}", adapter=ref, class_labels=[1], seed=3, steps=2)
        results[i] = rt.generate(task)

    threads = [threading.Thread(target=generate, args=(i, r)) for i, r in enumerate(refs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600
    while rt.engine.queue_depth() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(600)
    assert sorted(results) == [0, 1, 2]
    for r in results.values():
        assert [_png_size(b) for b in r.images_png_b64] == [(256, 256, "RGB")]
        assert max(r.batch_sizes) == 6  # 3 requests x (cond + null) rows in one forward
    pngs = [results[i].images_png_b64[0] for i in range(3)]
    assert len(set(pngs)) == 3  # each adapter changes the image; the base is the third

    # 4. 512 px: a 64x64 latent grid on the 256 base (positions i/2, j/2), decoded to 512 x 512
    request = SampleRequest(
        request_id="xl-512", adapter_key=refs[0].sha256, adapter_tensors=runs["difffit"][0], labels=[0],
        seed=1, steps=2, guidance_scale=4.0, scheduler_name="ddim", latent_size=64,
    )  # fmt: skip
    (png,) = to_pngs(rt.engine.submit(request).result(timeout=600))
    assert Image.open(io.BytesIO(png)).size == (512, 512)
