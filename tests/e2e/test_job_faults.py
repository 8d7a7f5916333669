"""Issue 14: a resource fault is a job fault, on a real stack.

The worker runs with the test hook DIFFFIT_TEST_FAULTS=oom-when-exists:PATH:
the first training step after the test creates PATH raises MemoryError, so
the test decides when (no race with the job's speed). That job fails with
``out-of-memory``; a generate issued while it ran and one issued after it
succeed, served by the same worker process.
"""

from __future__ import annotations

import time

import pytest

from .conftest import class_folder_zip, running_stack

pytestmark = pytest.mark.e2e
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def oom_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    trigger = root / "oom-now"
    faults = f"oom-when-exists:{trigger}"
    with running_stack(root, DIFFFIT_TEST_FAULTS=faults, OMP_NUM_THREADS="1") as st:
        class_folder_zip(st.root / "files" / "ds.zip", ["a", "b"], per_class=8)
        yield st, trigger


def _generate(client, seed: int) -> bytes:
    r = client.post("/generate", params={"class": 1, "steps": 4, "seed": seed})
    assert r.status_code == 200, r.text
    assert r.content.startswith(PNG_MAGIC)
    return r.content


def test_out_of_memory_fails_only_its_job_and_the_worker_lives_on(oom_stack):
    st, trigger = oom_stack
    worker = st.procs["worker-w1"]
    c = st.client(st.cli("tenant", "create", "acme"))
    body = {"dataset_url": f"{st.files_url}/ds.zip", "adapter": "doomed", "steps": 100_000, "batch_size": 8}
    r = c.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    # The job trains (it cannot end by itself before the trigger: 100k steps).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"]["step"] >= 1:
            break
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.2)
    else:
        raise AssertionError(f"job never trained: {job}; logs in {st.root}")

    _generate(c, seed=1)  # issued and served while the job trains
    assert c.get(f"/jobs/{job_id}").json()["state"] == "running"

    trigger.touch()
    job = st.wait_job(c, job_id, timeout=120)
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "out-of-memory", job
    assert "training" in job["error"]["message"] and "DIFFFIT_TRAIN_MICROBATCH" in job["error"]["message"]

    _generate(c, seed=2)  # the same worker still serves
    assert worker.poll() is None and st.procs["worker-w1"] is worker
    log = (st.root / "worker-w1.log").read_text()
    assert log.count("engine up") == 1  # the runtime (engine, resident base) was built once
