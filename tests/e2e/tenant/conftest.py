"""One real stack (redis-server, a Celery worker, uvicorn) for every tenant-side e2e test.

Package-scoped: the client, webhook, import, OpenAI, CLI and browser tests
share one start (each costs seconds on two busy cores). Webhook retries are
fast here (backoff 0.5 s) so a retry after a 500 is seen within the test.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffit.client import Client
from tests.e2e.conftest import Stack, running_stack
from tests.webhook_receiver import Receiver, running_receiver

CLASSES = ["dark", "mid", "light"]


def class_folder(root: Path, classes: list[str] = CLASSES, per_class: int = 6, seed: int = 0) -> Path:
    """A folder per class of small PNGs whose brightness depends on the class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            level = 40 + 180 * c / max(len(classes) - 1, 1)
            pixels = np.clip(rng.normal(level, 20, (12, 12)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            (root / name / f"{i}.png").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="package")
def tenant_stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("tenant_stack")
    with running_stack(root, DIFFFIT_WEBHOOK_BACKOFF_S="0.5", DIFFFIT_WEBHOOK_POLL_S="0.2") as st:
        yield st


@pytest.fixture(scope="package")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as rec:
        yield rec


@dataclass
class Trained:
    """A tenant with an adapter the stack trained through the client (see test_tenant_flow)."""

    key: str
    client: Client
    dataset: dict
    job: dict
    events: list


@pytest.fixture(scope="package")
def trained(tenant_stack, receiver, tmp_path_factory) -> Iterator[Trained]:
    key = tenant_stack.cli("tenant", "create", "alpha")
    client = Client(tenant_stack.api, key, timeout=120)
    folder = class_folder(tmp_path_factory.mktemp("shades") / "shades")
    dataset = client.upload_dataset(folder)
    receiver.script = [500]  # the first webhook call fails: it must be retried
    job = client.finetune(
        dataset_id=dataset["id"], adapter="shades", steps=12, batch_size=8, preview_every=6,
        webhook_url=receiver.url,
    )  # fmt: skip
    events: list = []
    job = client.wait(job["id"], timeout=300, on_event=events.append)
    yield Trained(key, client, dataset, job, events)
    client.close()
