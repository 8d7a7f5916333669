"""The engine runs sampling steps between the micro-batches of one training step (issue 13)."""

from __future__ import annotations

import threading

import torch

from core.base_model import load_base
from core.diffusion import GaussianDiffusion
from core.engine.engine import Engine
from core.engine.sampling import SampleRequest
from core.engine.training import TrainingData, TrainingRun
from difffit.contract import FinetuneRequest


def test_sampling_steps_run_between_the_micro_batches_of_one_training_step(tiny_base):
    base = load_base(tiny_base)
    # train_share 1.0: every loop iteration may train, and sampling still goes first in each
    # (at the default share one micro-step's time would buy the sampler all 40 steps here).
    engine = Engine(base, slots=2, max_classes=10, train_share=1.0).start()
    try:
        diffusion = GaussianDiffusion.from_scheduler_config(base.scheduler_config)
        data = TrainingData(torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,)), ["a", "b"])
        request = FinetuneRequest(dataset_url="x", adapter="a", steps=1, batch_size=8)
        run = engine.call(lambda: TrainingRun(engine.model, diffusion, data, request, microbatch=2)).result()
        sample = SampleRequest("s", None, None, [0], 0, 12, 2.0, "ddim", 8)
        seen: list[tuple[int, int]] = []  # (optimizer steps done, sampling steps done) per micro-step
        micro_step = run.micro_step

        def traced() -> bool:
            seen.append((run.progress.step, len(sample.batch_sizes)))
            return micro_step()

        run.micro_step = traced
        gate = threading.Event()
        engine.call(lambda: gate.wait(30))  # queue both before the engine looks
        training, sampling = engine.submit_training(run), engine.submit(sample)
        gate.set()
        training.result(timeout=120)
        sampling.result(timeout=120)
        assert len(seen) == 4 and all(step == 0 for step, _ in seen)  # 8 rows / 2: one optimizer step
        done = [n for _, n in seen]
        # a sampling step before each micro-batch, while the request is still sampling
        assert done == sorted(set(done)) and done[0] >= 1 and done[-1] < 12
        assert run.progress.step == 1 and len(sample.batch_sizes) == 12
    finally:
        engine.stop()
