"""Continuous batching gives each request exactly what it would get alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from base_models.tiny import make_tiny_base
from core.adapter.model import DiffFitDiT
from core.base_model import load_base
from core.engine.engine import Engine
from core.engine.images import to_pngs
from core.engine.sampling import SampleRequest, denoise_step
from difffit.contract import Placement
from tests.conftest import random_adapter

SCHEDULERS = ["ddim", "dpm++", "ddpm"]


def _request(i: int, slot: int, null: int, steps: int = 6) -> SampleRequest:
    r = SampleRequest(
        request_id=f"r{i}",
        adapter_key=None,
        adapter_tensors=None,
        labels=[i % 3, (i + 1) % 3],
        seed=100 + i,
        steps=steps,
        guidance_scale=[1.0, 1.5, 4.0][i % 3],
        scheduler_name=SCHEDULERS[i % 3],
        latent_size=8,
    )
    r.slot, r.null_label = slot, null
    return r


def test_request_in_a_mixed_batch_of_8_adapters_equals_it_alone(tiny_base):
    base = load_base(tiny_base)
    model = DiffFitDiT(base.transformer, slots=9, max_classes=10)
    for slot in range(1, 9):
        placement = Placement() if slot % 2 else Placement.bitfit()
        model.load_slot(slot, random_adapter(model, placement, 3, seed=slot))

    def start(r):
        r.start(base.scheduler_config, 1, torch.device("cpu"), torch.float32)
        return r

    # Together: 8 requests on 8 adapters, joining at different steps (continuous batching).
    together = [start(_request(i, i + 1, 3)) for i in range(8)]
    active, step = [], 0
    while any(not r.done for r in together):
        active = [r for r in together if not r.done and together.index(r) <= step]
        denoise_step(model, active, base.learned_sigma)
        step += 1
    assert max(max(r.batch_sizes) for r in together) > 8  # they really shared forwards

    for i, r in enumerate(together):
        alone = start(_request(i, i + 1, 3))
        while not alone.done:
            denoise_step(model, [alone], base.learned_sigma)
        # fp32 sums in a batch of 8..20 rows and in one of 2 run in another order: the random tiny
        # base's latents reach ~160 after 3 steps, so allow 1e-6 of that on top of 1e-4 (2 threads
        # measured 1.3e-4). A request routed to a wrong slot differs by O(1).
        tol = 1e-4 + 1e-6 * alone.latents.abs().max().item()
        assert (r.latents - alone.latents).abs().max().item() <= tol, f"request {i}"


@pytest.fixture(scope="module")
def base_1000(tmp_path_factory):
    # DiTPipeline hard-codes the null class as 1000, so this base has 1000 classes.
    return str(make_tiny_base(tmp_path_factory.mktemp("b1000"), vae=True, num_classes=1000))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_base_path_equals_diffusers_dit_pipeline(base_1000, scheduler):
    from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler

    base = load_base(base_1000)
    pipe_scheduler = (
        DDIMScheduler.from_config(base.scheduler_config)
        if scheduler == "ddim"
        # variance_type=None: diffusers' DPM-Solver slices learned-range outputs to 3 channels.
        else DPMSolverMultistepScheduler.from_config(
            base.scheduler_config, algorithm_type="dpmsolver++", variance_type=None
        )
    )
    plain = load_base(base_1000)
    pipe = DiTPipeline(transformer=plain.transformer, vae=plain.vae, scheduler=pipe_scheduler)
    labels = [3, 999]
    expected = pipe(
        class_labels=labels,
        guidance_scale=4.0,
        num_inference_steps=8,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images  # [2, 16, 16, 3] in [0, 1]

    model = DiffFitDiT(base.transformer, slots=2, max_classes=1000)
    r = SampleRequest("p", None, None, labels, 7, 8, 4.0, scheduler, 8)
    r.slot, r.null_label = 0, 1000
    r.start(base.scheduler_config, 4, torch.device("cpu"), torch.float32)
    while not r.done:
        denoise_step(model, [r], base.learned_sigma)
    with torch.no_grad():
        images = base.vae.decode(r.latents / base.latent_scaling).sample
    got = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_engine_thread_serves_concurrent_requests_and_a_full_bank(tiny_base):
    base = load_base(tiny_base)
    engine = Engine(base, slots=3, max_classes=10, max_batch_size=16).start()
    try:
        tensors = {}
        model = engine.model
        for k in range(4):  # 4 adapters through 2 free slots: forces LRU eviction
            tensors[f"{k:064x}"] = random_adapter(model, Placement(), 3, seed=k)
        futures = []
        for i, (key, t) in enumerate(tensors.items()):
            r = SampleRequest(f"e{i}", key, t, [0, 1], i, 4, 2.0, "ddim", 8)
            futures.append(engine.submit(r))
        images = [f.result(timeout=60) for f in futures]
        assert all(tuple(i.shape) == (2, 1, 8, 8) and i.dtype == torch.float32 for i in images)
        assert Image.open(io.BytesIO(to_pngs(images[0])[0])).size == (8, 8)
        stats = engine.stats()
        assert stats["misses"] == 4 and stats["evictions"] >= 2 and stats["resident"] == 2
    finally:
        engine.stop()
