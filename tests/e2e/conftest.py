"""A real stack for end-to-end tests: redis-server, a Celery worker, uvicorn.

Every piece is a separate process started the way operators start them
(the commands of ``difffit serve``); the tests talk HTTP to the API.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from base_models.tiny import make_tiny_base
from difffit.settings import Settings
from launch.demo import serve_folder
from launch.embedded import api_command, child_env, free_port, start_redis, stop_process, worker_command
from tests.pg import pg_reachable, throwaway_database

REPO = Path(__file__).resolve().parents[2]
# Every stack process on one thread: on a loaded 2-core machine, torch's default
# pool in each of them (worker, API, CLI) oversubscribes the cores many times over.
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Stack:
    root: Path
    settings: Settings
    env: dict[str, str]
    api: str
    files_url: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.api, headers=headers, timeout=120)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "launch.cli", *args],
            env=self.env, capture_output=True, text=True, timeout=120, check=True, cwd=REPO,
        )  # fmt: skip
        return out.stdout.strip()

    def start_worker(self, name: str = "w1") -> subprocess.Popen:
        argv = worker_command(self.settings) + ["-n", f"{name}@%h"]
        log = open(self.root / f"worker-{name}.log", "ab")  # noqa: SIM115 - kept open for the child
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs[f"worker-{name}"] = proc
        return proc

    def wait_job(self, client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
        return wait_job(client, job_id, timeout, logs=self.root)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 240, logs: Path | None = None) -> dict:
    """Poll a job every 0.5 s until it is terminal; AssertionError (naming the logs) at the deadline."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {job}; logs in {logs}")


def class_folder_zip(path: Path, classes: list[str], per_class: int, seed: int = 0) -> Path:
    """A zip with one folder per class of small images whose brightness depends on the class."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for c, name in enumerate(classes):
            for i in range(per_class):
                level = 40 + 180 * c / max(len(classes) - 1, 1)
                pixels = np.clip(rng.normal(level, 20, (12, 12)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels, mode="L").save(buf, format="PNG")
                zf.writestr(f"{name}/{i}.png", buf.getvalue())
    return path


@contextlib.contextmanager
def running_stack(root: Path, **extra_env: str) -> Iterator[Stack]:
    """The stack on the local PostgreSQL when it answers, else on SQLite (issue 7)."""
    if pg_reachable():
        with throwaway_database("difffit_e2e") as url, _running_stack(root, url, **extra_env) as st:
            yield st
    else:
        with _running_stack(root, None, **extra_env) as st:
            yield st


def start_files_and_redis(root: Path):
    """A file server for data sets on root/files and a throwaway redis-server.

    Returns (file server, its URL, the redis process, its URL); the caller stops both.
    """
    files = root / "files"
    files.mkdir()
    server, files_url = serve_folder(files)
    redis_port = free_port()
    redis = start_redis(redis_port, root / "redis", persistent=False)
    return server, files_url, redis, f"redis://127.0.0.1:{redis_port}/0"


@contextlib.contextmanager
def _running_stack(root: Path, database_url: str | None, **extra_env: str) -> Iterator[Stack]:
    """Start redis-server, one worker (w1) and the API; stop them all on exit."""
    base = make_tiny_base(root / "base")
    server, files_url, redis, redis_url = start_files_and_redis(root)
    api_port = free_port()
    os.environ.pop("DIFFFIT_DATABASE_URL", None)
    settings = Settings(
        data_dir=root / "data",
        database_url=database_url,
        redis_url=redis_url,
        base_model=str(base),
        api_port=api_port,
        engine_threads=4,
    )
    settings.data_dir.mkdir(parents=True)
    env = child_env(settings, redis_url)
    # A dict literal, so extra_env may also override these defaults (e.g. the generate timeout).
    env.update(
        {
            **QUIET_THREADS,
            "DIFFFIT_BASE_MODEL": str(base),
            "DIFFFIT_ALLOW_PRIVATE_URLS": "true",
            "DIFFFIT_CHECKPOINT_EVERY": "10",
            "DIFFFIT_GENERATE_TIMEOUT_S": "120",
            "DIFFFIT_API_PORT": str(api_port),
            **extra_env,
        }
    )
    st = Stack(root, settings, env, f"http://127.0.0.1:{api_port}", files_url, {"redis": redis})
    try:
        st.cli("tenant", "create", "bootstrap")  # creates the schema before two processes race to
        st.start_worker("w1")
        api_log = open(root / "api.log", "ab")  # noqa: SIM115
        st.procs["api"] = subprocess.Popen(
            api_command(settings), env=env, stdout=api_log, stderr=subprocess.STDOUT, cwd=REPO
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{st.api}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"API did not start; see {root / 'api.log'}")
        yield st
    finally:
        for proc in reversed(list(st.procs.values())):
            stop_process(proc, timeout_s=10)
        server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as st:
        yield st


@dataclass
class ServeStack:
    """`difffit serve` as a real subprocess: its own Redis, one worker it supervises, the API."""

    root: Path
    proc: subprocess.Popen
    api: str
    key: str
    files_url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {self.key}"}, timeout=120)

    def log(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")

    @property
    def redis_url(self) -> str:
        """The Redis `difffit serve` started (it prints the URL)."""
        import re

        match = re.search(r"Started Redis at (redis://\S+)", self.log())
        assert match, self.log()[-3000:]
        return match.group(1)

    def worker_pid(self, timeout: float = 60) -> int:
        """The pid of the celery worker `difffit serve` runs now (its child)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _children(self.proc.pid):
                if b"celery" in _cmdline(pid) and b"worker" in _cmdline(pid):
                    return pid
            time.sleep(0.2)
        raise AssertionError(f"no worker under difffit serve after {timeout}s; see {self.root}/serve.log")

    def wait_ready(self, timeout: float = 120) -> dict:
        """Poll /readyz until it is 200 (a worker published live stats)."""
        deadline = time.monotonic() + timeout
        body: object = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"difffit serve exited: {self.log()[-3000:]}"
            try:
                r = httpx.get(f"{self.api}/readyz", timeout=5)
                body = r.json()
                if r.status_code == 200:
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"/readyz not 200 after {timeout}s: {body}; see {self.root}/serve.log")

    def wait_job(self, client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
        return wait_job(client, job_id, timeout, logs=self.root)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def running_serve(root: Path, **extra_env: str) -> Iterator[ServeStack]:
    """`python -m launch.cli serve` on the tiny base with SQLite and its own Redis; stopped on exit."""
    base = make_tiny_base(root / "base")
    files = root / "files"
    files.mkdir()
    server, files_url = serve_folder(files)
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFFIT_")}
    env.update(
        {
            **QUIET_THREADS,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "DIFFFIT_DATA_DIR": str(root / "data"),
            "DIFFFIT_BASE_MODEL": str(base),
            "DIFFFIT_API_PORT": str(api_port),
            "DIFFFIT_ALLOW_PRIVATE_URLS": "true",
            "DIFFFIT_ENGINE_THREADS": "4",
            "DIFFFIT_GENERATE_TIMEOUT_S": "120",
            "DIFFFIT_LOG_JSON": "false",
            **extra_env,
        }
    )
    log = open(root / "serve.log", "ab")  # noqa: SIM115 - kept open for the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
    )
    try:
        key_file = root / "data" / "api-key.txt"
        deadline = time.monotonic() + 120
        while not key_file.exists() or not key_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, (root / "serve.log").read_text()
            time.sleep(0.2)
        st = ServeStack(root, proc, f"http://127.0.0.1:{api_port}", key_file.read_text().strip(), files_url)
        st.wait_ready()
        yield st
    finally:
        stop_process(proc, timeout_s=60)
        log.close()
        server.shutdown()
