"""The whole path over HTTP: tenant -> /finetune -> job succeeded -> /generate PNG."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from .conftest import class_folder_zip

pytestmark = pytest.mark.e2e
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_finetune_then_generate_and_tenant_isolation(stack):
    key_a = stack.cli("tenant", "create", "acme")
    key_b = stack.cli("tenant", "create", "globex")
    assert key_a.startswith("dfs_") and key_a != key_b
    class_folder_zip(stack.root / "files" / "shades.zip", ["dark", "mid", "light"], per_class=8)
    a, b = stack.client(key_a), stack.client(key_b)

    # Base model works before any adapter exists.
    r = a.post("/generate", params={"class": 3, "steps": 4, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content.startswith(PNG_MAGIC)

    body = {
        "dataset_url": f"{stack.files_url}/shades.zip",
        "adapter": "shades",
        "steps": 25,
        "batch_size": 8,
    }
    r = a.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and r.headers["location"].endswith(job["id"])

    job = stack.wait_job(a, job["id"])
    assert job["state"] == "succeeded", job
    assert job["adapter_version"] == 1

    adapter = a.get("/adapters/shades").json()
    assert adapter["latest_version"] == 1
    version = adapter["versions"][0]
    assert version["class_names"] == ["dark", "light", "mid"]
    assert version["trainable_params"] > 0

    r = a.post("/generate", params={"adapter": "shades", "class": "light", "n": 1, "steps": 5})
    assert r.status_code == 200, r.text
    assert r.content.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)

    r = a.post(
        "/generate",
        params={"adapter": "shades", "class": 0, "n": 3, "steps": 4, "scheduler": "ddpm"},
        headers={"Accept": "application/json"},
    )
    assert r.status_code == 200 and len(r.json()["images"]) == 3

    # Another tenant can neither see nor use the adapter or the job.
    r = b.post("/generate", params={"adapter": "shades", "class": 0, "steps": 2})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/adapter-not-found")
    assert b.get("/adapters/shades").status_code == 404
    assert b.get(f"/jobs/{job['id']}").status_code == 404
    assert b.get("/adapters").json() in ([], {"adapters": []}) or not b.get("/adapters").json().get(
        "adapters"
    )

    # Out-of-range classes and unknown class names are the caller's error, not a 500.
    assert a.post("/generate", params={"adapter": "shades", "class": 7, "steps": 2}).status_code == 422
    assert a.post("/generate", params={"adapter": "shades", "class": "nope"}).status_code == 422


def test_broken_dataset_fails_the_job_with_its_reason(stack):
    key = stack.cli("tenant", "create", "initech")
    class_folder_zip(stack.root / "files" / "one.zip", ["lonely"], per_class=3)
    c = stack.client(key)
    r = c.post("/finetune", json={"dataset_url": f"{stack.files_url}/one.zip", "adapter": "x", "steps": 5})
    assert r.status_code == 202
    job = stack.wait_job(c, r.json()["id"], timeout=120)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid-dataset"
    assert "only one class folder" in job["error"]["message"]


def test_worker_publishes_its_stats_to_redis(stack):
    import json

    import redis

    client = redis.Redis.from_url(stack.settings.redis_url)
    deadline = time.monotonic() + 30
    keys = []
    while not keys and time.monotonic() < deadline:
        keys = client.keys("difffit:worker:*")
    assert keys, "no worker announced itself"
    stats = json.loads(client.get(keys[0]))
    assert stats["hostname"].startswith("w1@") and stats["slots"] == 16
    assert sorted(stats["queues"]) == ["finetune", "generate"]
    assert len(stats["base_hash"]) == 64 and stats["class_names"][:2] == ["class0", "class1"]


def test_stack_runs_on_postgresql_when_it_is_reachable(stack):
    from tests.pg import pg_reachable

    url = stack.env["DIFFFIT_DATABASE_URL"]
    assert url.startswith("postgresql") if pg_reachable() else url.startswith("sqlite")
