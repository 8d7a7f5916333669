"""Two "hosts" sharing only Redis, the registry and an S3 bucket: trained on one, served by the other.

Host A runs a Celery worker that takes only fine-tune jobs, host B one that
takes only generate requests, each with its own data folder and its own copy
of the base model; the API has a third folder. Blobs live in a bucket of the
moto S3 server (real HTTP on loopback, tests/s3.py). The registry is this
machine's PostgreSQL when it answers; otherwise a SQLite file both hosts
open (the only shared path then, standing in for the database server).

The same stack then shows the lifecycle end to end: after DELETE of the
adapter the bucket holds no object of the adapter or of its job (checkpoints
included), and purging the tenant leaves nothing of it in the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from adapters_store import Registry
from base_models.tiny import make_tiny_base
from difffit import contract
from difffit.settings import Settings
from launch.embedded import api_command, child_env, free_port, stop_process, worker_command
from tests.pg import pg_reachable, throwaway_database
from tests.s3 import bucket_keys, new_bucket

from .conftest import QUIET_THREADS, class_folder_zip, start_files_and_redis, wait_job

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "two-hosts-admin"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Hosts:
    root: Path
    endpoint: str
    bucket: str
    database_url: str
    api: str
    files_url: str
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def cli(self, host: str, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "launch.cli", *args],
            env=self.env[host], capture_output=True, text=True, timeout=120, check=True, cwd=REPO,
        )  # fmt: skip
        return out.stdout.strip()


def _settings(
    folder: Path, base: Path, database_url: str, redis_url: str, endpoint: str, bucket: str
) -> Settings:
    return Settings(
        data_dir=folder,
        database_url=database_url,
        redis_url=redis_url,
        base_model=str(base),
        blob_url=f"s3://{bucket}/blobs",
        s3_endpoint_url=endpoint,
        engine_threads=2,
    )


def _spawn(hosts: Hosts, name: str, argv: list[str]) -> None:
    log = open(hosts.root / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child
    proc = subprocess.Popen(argv, env=hosts.env[name], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    hosts.procs[name] = proc


def _only_queue(argv: list[str], queue: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("-Q") + 1] = queue
    return argv


@contextlib.contextmanager
def _database(root: Path) -> Iterator[str]:
    if pg_reachable():
        with throwaway_database("difffit_hosts") as url:
            yield url
    else:
        shared = root / "shared-registry"
        shared.mkdir()
        yield f"sqlite:///{shared / 'registry.db'}"


@contextlib.contextmanager
def two_hosts(root: Path, endpoint: str) -> Iterator[Hosts]:
    bucket = new_bucket(endpoint)
    server, files_url, redis, redis_url = start_files_and_redis(root)
    api_port = free_port()
    with _database(root) as database_url:
        hosts = Hosts(root, endpoint, bucket, database_url, f"http://127.0.0.1:{api_port}", files_url)
        hosts.procs["redis"] = redis
        base = make_tiny_base(root / "base-original")
        try:
            for name in ("worker-a", "worker-b", "api"):
                folder = root / name
                folder.mkdir()
                if name != "api":  # the API never loads the model
                    shutil.copytree(base, folder / "base")  # each host its own copy
                settings = _settings(
                    folder / "data", folder / "base", database_url, redis_url, endpoint, bucket
                )
                settings.data_dir.mkdir()
                env = child_env(settings, redis_url)
                env.update(
                    {
                        **QUIET_THREADS,
                        "DIFFFIT_BASE_MODEL": str(folder / "base"),
                        "DIFFFIT_ALLOW_PRIVATE_URLS": "true",
                        "DIFFFIT_GENERATE_TIMEOUT_S": "120",
                        "DIFFFIT_API_PORT": str(api_port),
                        "DIFFFIT_ADMIN_KEY": ADMIN_KEY,
                    }
                )
                env.pop("DIFFFIT_BLOB_DIR", None)
                hosts.env[name] = env
            hosts.cli("api", "db", "upgrade")  # the schema, before three processes race to create it
            api_settings = _settings(root / "api" / "data", root / "api" / "base", database_url, redis_url,
                                     endpoint, bucket).model_copy(update={"api_port": api_port})  # fmt: skip
            _spawn(hosts, "worker-a", _only_queue(worker_command(api_settings), contract.FINETUNE_QUEUE))
            _spawn(hosts, "worker-b", _only_queue(worker_command(api_settings), contract.GENERATE_QUEUE))
            _spawn(hosts, "api", api_command(api_settings))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{hosts.api}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            else:
                raise RuntimeError(f"stack not ready after 120 s; logs in {root}")
            yield hosts
        finally:
            # Signal the API and both workers at once, then wait: their shutdowns overlap.
            services = [p for n, p in hosts.procs.items() if n != "redis"]
            for proc in services:
                if proc.poll() is None:
                    proc.terminate()
            for proc in [*services, redis]:
                stop_process(proc, timeout_s=20)
            server.shutdown()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Hosts]:
    with two_hosts(tmp_path_factory.mktemp("hosts"), s3_endpoint) as h:
        yield h


def _local_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and "base" not in p.relative_to(folder).parts[:1]]


def test_trained_on_one_host_served_by_the_other_then_deleted_and_purged(hosts: Hosts) -> None:
    admin = httpx.Client(base_url=hosts.api, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    created = admin.post("/admin/tenants", json={"name": "acme"})
    assert created.status_code == 201, created.text
    c = httpx.Client(
        base_url=hosts.api, headers={"Authorization": f"Bearer {created.json()['api_key']}"}, timeout=120
    )
    class_folder_zip(hosts.root / "files" / "shades.zip", ["dark", "light"], per_class=8)
    body = {
        "dataset_url": f"{hosts.files_url}/shades.zip",
        "adapter": "shades",
        "steps": 16,
        "batch_size": 8,
        "checkpoint_every": 4,
    }
    r = c.post("/finetune", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300, logs=hosts.root)
    assert job["state"] == "succeeded", (job, hosts.log("worker-a")[-3000:])

    # Trained on A: only A takes fine-tunes, and only A's log has the job.
    assert job["id"] in hosts.log("worker-a") and job["id"] not in hosts.log("worker-b")
    version = c.get("/adapters/shades").json()["versions"][0]
    keys = bucket_keys(hosts.endpoint, hosts.bucket)
    assert f"blobs/{version['sha256'][:2]}/{version['sha256'][2:4]}/{version['sha256']}" in keys

    # Served by B: only B takes generate requests, and it has never seen the adapter locally.
    r = c.post("/generate", params={"adapter": "shades", "class": "light", "steps": 4})
    assert r.status_code == 200, (r.text, hosts.log("worker-b")[-3000:])
    assert r.content.startswith(PNG_MAGIC)
    received = f"Task {contract.GENERATE_TASK}["
    assert received in hosts.log("worker-b") and received not in hosts.log("worker-a")
    # Neither host, nor the API, keeps blobs in its data folder: they are all in the bucket.
    for name in ("worker-a", "worker-b", "api"):
        assert not (hosts.root / name / "data" / "blobs").exists(), name

    # The API streams the adapter file from the bucket.
    r = c.get(version["file_urls"]["adapter.safetensors"])
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == version["sha256"]

    # Checkpoints were written (and freed as they were replaced and when the job ended).
    events = Registry(hosts.database_url).job_events(job["id"])
    checkpoints = [e.data["sha256"] for e in events if e.kind == "checkpoint"]
    assert checkpoints, [e.kind for e in events]

    assert c.delete("/adapters/shades").status_code == 204
    # The worker frees the last checkpoint just after it marks the job succeeded: poll for it.
    deadline = time.monotonic() + 60
    while (left := bucket_keys(hosts.endpoint, hosts.bucket)) and time.monotonic() < deadline:
        time.sleep(0.5)
    mine = {version["sha256"], *version["files"].values(), *checkpoints}
    assert not [k for k in left if k.rsplit("/", 1)[-1] in mine]
    assert left == []  # nothing else was ever stored

    # Purging the tenant removes the rest: its key, the job and its events.
    assert admin.delete("/admin/tenants/acme").status_code == 204
    assert c.get("/adapters").status_code == 401
    registry = Registry(hosts.database_url)
    with registry._db.engine.connect() as conn:
        for table in ("tenants", "api_keys", "adapters", "adapter_versions", "jobs", "job_events"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0, table
    registry.close()
