"""`difffit serve` keeps a worker running (issue 14): engine death and SIGKILL mid fine-tune.

One real `difffit serve` (its own Redis, one worker it supervises, the API),
started with the engine-kill test hook (DIFFFIT_TEST_HOOKS: SIGUSR1 makes
the worker's engine thread raise).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
import redis
import torch
from safetensors.torch import load as load_safetensors

from .conftest import class_folder_zip, pid_alive, running_serve

pytestmark = pytest.mark.e2e
EVERY = 50


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with running_serve(root, DIFFFIT_TEST_HOOKS="true", DIFFFIT_ENGINE_THREADS="8") as st:
        class_folder_zip(st.root / "files" / "ds.zip", ["a", "b"], per_class=8)
        yield st


def _finetune(c: httpx.Client, st, adapter: str, steps: int, seed: int = 3) -> dict:
    body = {
        "dataset_url": f"{st.files_url}/ds.zip",
        "adapter": adapter,
        "steps": steps,
        "batch_size": 8,
        "checkpoint_every": EVERY,
        "seed": seed,
        "ema": True,
    }
    r = c.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def _wait_for_event(c: httpx.Client, job_id: str, kind: str) -> dict:
    """Follow the job's event stream until the first `kind` event; its data."""
    with c.stream("GET", f"/jobs/{job_id}/events", timeout=httpx.Timeout(120)) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == kind:
                return json.loads(line.split(":", 1)[1])
            elif event == "end":
                break
    raise AssertionError(f"job {job_id} ended without a {kind} event")


def _events(c: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    out, event = [], None
    with c.stream("GET", f"/jobs/{job_id}/events") as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event:
                out.append((event, json.loads(line.split(":", 1)[1])))
            if event == "end":
                break
    return out


def _adapter(c: httpx.Client, name: str) -> dict[str, torch.Tensor]:
    r = c.get(f"/adapters/{name}/versions/1/files/adapter.safetensors")
    assert r.status_code == 200, r.text
    return load_safetensors(r.content)


def _wait_worker_exit(st, pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} still running; see {st.root}/serve.log"
        time.sleep(0.2)


def _wait_log(st, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in st.log():
        assert time.monotonic() < deadline, f"{text!r} not in serve.log: {st.log()[-3000:]}"
        time.sleep(0.2)


def test_dead_engine_fails_requests_at_once_reports_down_and_serve_brings_a_new_worker(serve):
    st = serve
    c = st.client()
    st.wait_ready()
    pid = st.worker_pid()

    # A fine-tune that has written a checkpoint, and generates sampling in the engine.
    running = _finetune(c, st, "through-death", steps=2000)
    _wait_for_event(c, running["id"], "checkpoint")
    answers: list[tuple[httpx.Response, float]] = []

    def generate(seed: int) -> None:
        r = c.post("/generate", params={"class": 1, "steps": 1000, "n": 16, "seed": seed})
        answers.append((r, time.monotonic()))

    posts = [threading.Thread(target=generate, args=(seed,)) for seed in range(6)]
    for t in posts:
        t.start()
    # All six delivered to the worker and unacknowledged (late acks: running) next to the
    # fine-tune; their 6 x 1000 steps of 32 rows take seconds, so they are still sampling.
    broker = redis.Redis.from_url(st.redis_url)
    deadline = time.monotonic() + 60
    while not (broker.llen("generate") == 0 and broker.hlen("unacked") + len(answers) >= 7):
        assert time.monotonic() < deadline, answers
        time.sleep(0.05)
    broker.close()

    os.kill(pid, signal.SIGUSR1)
    killed_at = time.monotonic()
    # /readyz goes 503 naming the worker before a new one replaces it.
    hostname = f"celery@{socket.gethostname()}"
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{st.api}/readyz", timeout=5)
        if r.status_code == 503 and r.json().get("workers_down") == [hostname]:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.json()["checks"]["workers"] == "down"

    for t in posts:
        t.join(60)
    # Pending in the engine at its death: each fails within moments, none waits out a timeout.
    failed = [(r, at) for r, at in answers if r.status_code != 200]
    assert len(answers) == 6 and failed, [r.status_code for r, _ in answers]
    for r, at in failed:
        assert r.status_code == 503 and r.json()["type"].endswith("/engine-dead"), r.text
        assert r.headers["Retry-After"]
        assert at - killed_at < 10, at - killed_at  # failed at once, not after a timeout

    # The worker exits 70; serve starts a new one, which finishes both jobs.
    _wait_worker_exit(st, pid)
    _wait_log(st, "worker exited with code 70; restarting it")
    queued = _finetune(c, st, "after-death", steps=20)
    st.wait_ready()
    assert st.worker_pid() != pid
    done = st.wait_job(c, queued["id"], timeout=120)
    assert done["state"] == "succeeded", done
    done = st.wait_job(c, running["id"], timeout=120)
    assert done["state"] == "succeeded", done
    kinds = [kind for kind, _ in _events(c, running["id"])]
    assert "resumed" in kinds and "failed" not in kinds, kinds


def test_sigkill_mid_finetune_under_serve_resumes_to_the_uninterrupted_adapter(serve):
    st = serve
    c = st.client()
    st.wait_ready()
    straight = st.wait_job(c, _finetune(c, st, "straight", steps=1000, seed=11)["id"], timeout=120)
    assert straight["state"] == "succeeded", straight

    pid = st.worker_pid()
    job = _finetune(c, st, "killed", steps=1000, seed=11)
    first = _wait_for_event(c, job["id"], "checkpoint")
    os.kill(pid, signal.SIGKILL)
    assert first["step"] % EVERY == 0 and first["step"] < 1000
    _wait_worker_exit(st, pid)
    _wait_log(st, "worker exited with code -9; restarting it")

    done = st.wait_job(c, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2
    events = _events(c, job["id"])
    resumed = [data for kind, data in events if kind == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= EVERY and resumed[0]["step"] % EVERY == 0, events

    want, got = _adapter(c, "straight"), _adapter(c, "killed")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
