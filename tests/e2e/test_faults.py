"""Faults on a real stack: a worker restart loses nothing, a corrupt blob fails loudly.

Both run on one stack whose generate timeout is short (10 s), so requests
that no worker serves come back as 504s with a task id instead of hanging.
Every other wait is a poll with a deadline of minutes: a loaded machine is
slow, not wrong.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from adapters_store import FileBlobStore
from launch.embedded import stop_process

from .conftest import class_folder_zip, running_stack

pytestmark = pytest.mark.e2e
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GENERATE_TIMEOUT_S = 10
SLOW_S = 180  # deadline of every wait for work a (possibly loaded) worker does


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with running_stack(root, DIFFFIT_GENERATE_TIMEOUT_S=str(GENERATE_TIMEOUT_S)) as st:
        class_folder_zip(st.root / "files" / "ds.zip", ["a", "b"], per_class=8)
        yield st


def _finetune(client, st, adapter: str) -> dict:
    body = {"dataset_url": f"{st.files_url}/ds.zip", "adapter": adapter, "steps": 10, "batch_size": 8}
    r = client.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def _poll_png(client, task_id: str, timeout: float) -> bytes:
    """The one image of a generate request that outlived its wait, once a worker answers it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/generate/{task_id}").json()
        if status["state"] == "succeeded":
            (png,) = [base64.b64decode(s) for s in status["images"]]
            return png
        time.sleep(0.5)
    raise AssertionError(f"generate request {task_id} not answered after {timeout} s")


def _png(client, params: dict, timeout: float = SLOW_S) -> bytes:
    """An image; a 504 (worker starting or busy) is polled until it arrives."""
    r = client.post("/generate", params=params)
    if r.status_code == 504:
        return _poll_png(client, r.json()["task_id"], timeout)
    assert r.status_code == 200, r.text
    return r.content


def _base_png(client, seed: int, timeout: float = SLOW_S) -> bytes:
    """A base-model image (class 1, 4 steps)."""
    return _png(client, {"class": 1, "steps": 4, "seed": seed}, timeout)


def test_worker_restart_loses_no_accepted_request(fault_stack):
    st = fault_stack
    c = st.client(st.cli("tenant", "create", "restart"))
    _base_png(c, seed=0)  # w1 is up and warm

    # Stop the only worker the way an orchestrator does (SIGTERM, warm shutdown).
    stop_process(st.procs.pop("worker-w1"), timeout_s=30)

    # Requests accepted while no worker runs: generate waits out its timeout (504 +
    # task id), the fine-tune job is accepted and stays queued.
    job = _finetune(c, st, "restarted")
    with ThreadPoolExecutor(3) as pool:
        waits = list(
            pool.map(
                lambda seed: c.post("/generate", params={"class": 1, "steps": 4, "seed": seed}),
                [11, 12, 13],
            )
        )
    for r in waits:
        assert r.status_code == 504, r.text
        problem = r.json()
        assert problem["type"].endswith("/generation-timeout"), problem
        assert problem["poll"] == f"/generate/{problem['task_id']}"
    task_ids = [r.json()["task_id"] for r in waits]
    assert c.get(f"/jobs/{job['id']}").json()["state"] == "queued"
    assert all(c.get(f"/generate/{t}").json()["state"] == "pending" for t in task_ids)

    # A new worker picks up everything that waited in Redis.
    st.start_worker("w2")
    done = st.wait_job(c, job["id"], timeout=SLOW_S)
    assert done["state"] == "succeeded", done
    for t in task_ids:
        png = _poll_png(c, t, timeout=SLOW_S)
        assert png.startswith(PNG_MAGIC) and Image.open(io.BytesIO(png)).size == (8, 8)
    # The late answer is the same image a direct request gets (seed 11, class 1, 4 steps).
    assert _poll_png(c, task_ids[0], timeout=5) == _base_png(c, seed=11)


def test_corrupt_blob_fails_the_request_and_keeps_the_registry(fault_stack):
    st = fault_stack
    c = st.client(st.cli("tenant", "create", "corrupt"))
    job = st.wait_job(c, _finetune(c, st, "fragile")["id"], timeout=SLOW_S)
    assert job["state"] == "succeeded", job
    before = c.get("/adapters/fragile").json()
    (version,) = before["versions"]

    # Flip bytes in the middle of the adapter file; its size stays the same.
    path = FileBlobStore(st.settings.resolved_blob_dir).path_for(version["sha256"])
    original = path.read_bytes()
    middle = len(original) // 2
    path.write_bytes(
        original[:middle] + bytes(b ^ 0xFF for b in original[middle : middle + 16]) + original[middle + 16 :]
    )

    r = c.post("/generate", params={"adapter": "fragile", "class": "a", "steps": 4})
    assert r.status_code == 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["type"].endswith("/corrupt-blob"), problem
    assert "integrity" in problem["detail"]

    # The registry is untouched, other work goes on, and a repaired file serves again.
    assert c.get("/adapters/fragile").json() == before
    _base_png(c, seed=3)
    path.write_bytes(original)
    assert _png(c, {"adapter": "fragile", "class": "a", "steps": 4}).startswith(PNG_MAGIC)
