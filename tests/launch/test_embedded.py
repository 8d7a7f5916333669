"""launch.embedded: the redis-server helper, the supervisor and `difffit serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from difffit.settings import Settings
from launch import embedded

REPO = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_redis_server_binary_exists():
    binary = embedded.redis_server_binary()
    assert binary.name == "redis-server" and binary.is_file() and os.access(binary, os.X_OK)


def test_start_redis_answers_ping_and_stops(tmp_path):
    port = embedded.free_port()
    proc = embedded.start_redis(port, tmp_path)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        assert client.ping() is True
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("save") == {"save": ""}
    finally:
        client.close()
        code = embedded.stop_process(proc, timeout_s=5)
    assert code == 0  # SIGTERM: clean shutdown
    assert (tmp_path / "redis.log").exists()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=None).ping()


def test_start_redis_reports_a_failed_start(tmp_path):
    port = embedded.free_port()
    first = embedded.start_redis(port, tmp_path / "a", persistent=False)
    try:
        with pytest.raises(RuntimeError):
            embedded.start_redis(port, tmp_path / "b", persistent=False, timeout_s=5)
    finally:
        embedded.stop_process(first, timeout_s=5)


def test_supervisor_stops_children_in_reverse_order_on_stop():
    sup = embedded.Supervisor(poll_s=0.05)
    procs = [subprocess.Popen(SLEEPER) for _ in range(2)]
    sup.add("a", procs[0], stop_timeout_s=5)
    sup.add("b", procs[1], stop_timeout_s=5)
    threading.Timer(0.2, sup.stop_event.set).start()
    assert sup.run() == 0
    assert all(p.poll() is not None for p in procs)


def test_supervisor_returns_1_naming_the_dead_child(capsys):
    sup = embedded.Supervisor(poll_s=0.05)
    keeper = subprocess.Popen(SLEEPER)
    sup.add("keeper", keeper, stop_timeout_s=5)
    sup.add("worker", subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    assert sup.run() == 1
    assert keeper.poll() is not None
    assert "worker exited unexpectedly with code 3" in capsys.readouterr().err


def test_stop_process_kills_after_timeout():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == b"ready"
    t0 = time.monotonic()
    assert embedded.stop_process(proc, timeout_s=0.3) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_commands_and_env(tmp_path):
    s = Settings(data_dir=tmp_path, engine_threads=3, api_host="0.0.0.0", api_port=8123)
    worker = embedded.worker_command(s)
    assert worker[:6] == [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"]
    assert worker[worker.index("-Q") + 1] == "generate,finetune"
    assert worker[worker.index("--pool") + 1] == "threads"
    assert worker[worker.index("--concurrency") + 1] == "3"
    api = embedded.api_command(s)
    assert api[:5] == [sys.executable, "-m", "uvicorn", "service.main:app_factory", "--factory"]
    assert api[api.index("--port") + 1] == "8123"
    env = embedded.child_env(s, "redis://127.0.0.1:1234/0")
    assert env["DIFFFIT_REDIS_URL"] == "redis://127.0.0.1:1234/0"
    assert env["DIFFFIT_DATABASE_URL"].startswith("sqlite:///")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_runs_redis_and_api_and_stops_on_sigterm(tmp_path):
    """The whole `difffit serve` with the worker replaced by a sleeper."""
    port = embedded.free_port()
    code = (
        "import sys\n"
        "from launch import embedded\n"
        f"embedded.worker_command = lambda s: {SLEEPER!r}\n"
        "sys.exit(embedded.serve())\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("DIFFFIT_")
    } | {
        "DIFFFIT_DATA_DIR": str(tmp_path / "data"),
        "DIFFFIT_API_PORT": str(port),
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "is running at" in line:
                break
        out = "".join(lines)
        assert f"is running at http://127.0.0.1:{port}" in out, out
        key = (tmp_path / "data" / "api-key.txt").read_text().strip()
        assert key in out
        assert oct((tmp_path / "data" / "api-key.txt").stat().st_mode & 0o777) == "0o600"
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        # The worker is a sleeper that publishes no stats: not ready, and /readyz says why.
        assert (status, body["checks"]) == (
            503,
            {"registry": "ok", "blobs": "ok", "redis": "ok", "workers": "down"},
        ), body
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/adapters", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read()) == {"adapters": []}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert (tmp_path / "data" / "registry.db").exists()
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
