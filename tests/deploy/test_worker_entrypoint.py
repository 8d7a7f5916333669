"""deploy/worker-entrypoint.sh: each scaled worker claims a different GPU.

Run with a fake `python` (reports 2 GPUs) and a fake `celery` (prints the GPU
it got, then holds it) on PATH; no GPU or Docker needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "deploy" / "worker-entrypoint.sh"

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) not installed here")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho 2\n")
    (bin_dir / "celery").write_text(
        '#!/bin/sh\necho "GPU=${CUDA_VISIBLE_DEVICES:-none} ARGS=$*"\nexec sleep 60\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    locks = tmp_path / "locks"
    locks.mkdir()
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GPU_LOCK_DIR": str(locks),
        "GPU_WAIT_S": "0.2",
        "HOSTNAME": "w",
        "DIFFFIT_QUEUES": "finetune",
    }


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def _start(env: dict[str, str], procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        ["sh", str(SCRIPT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    procs.append(p)
    return p


def _gpu(p: subprocess.Popen[str]) -> str:
    line = p.stdout.readline()  # blocks until the fake celery prints
    assert line.startswith("GPU="), line
    return line.split()[0].removeprefix("GPU=")


def test_replicas_claim_distinct_gpus_and_wait_for_a_free_one(env, procs) -> None:
    a, b = _start(env, procs), _start(env, procs)
    gpu_a, gpu_b = _gpu(a), _gpu(b)
    assert {gpu_a, gpu_b} == {"0", "1"}
    c = _start(env, procs)
    time.sleep(0.5)
    assert c.poll() is None  # a third replica on a 2-GPU host waits
    # When a worker dies, even by SIGKILL, the kernel drops its lock.
    os.killpg(a.pid, signal.SIGKILL)
    a.wait(5)
    assert _gpu(c) == gpu_a
    assert "taken by other workers" in c.stderr.readline()


def test_pinned_or_unlocked_workers_start_as_configured(env, procs) -> None:
    p = _start({**env, "CUDA_VISIBLE_DEVICES": "3"}, procs)
    line = p.stdout.readline()
    assert line.startswith("GPU=3 ")
    assert "-Q finetune" in line and "--pool threads" in line and "celery@w" in line
    p2 = _start({**env, "GPU_LOCK_DIR": "/nonexistent"}, procs)
    assert _gpu(p2) == "none"
