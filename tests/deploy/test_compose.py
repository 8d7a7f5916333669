"""docker-compose.yml, parsed: the services, healthchecks, volumes and GPU
reservations that `docker compose up --scale worker=N` relies on.

No Docker engine is needed: the file is read with PyYAML (merge keys and
anchors resolve as compose resolves them).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from .conftest import REPO
from .test_dockerfile import stages

WORKERS = ("worker", "worker-train")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """source -> container path of the service's short-syntax volumes."""
    out = {}
    for vol in service.get("volumes", []):
        source, target = vol.split(":")[:2] if isinstance(vol, str) else (vol["source"], vol["target"])
        out[source] = target
    return out


def _named_volumes(service: dict[str, Any]) -> set[str]:
    return {s for s in _volumes(service) if not s.startswith((".", "/", "$", "~"))}


def _has_healthcheck(service: dict[str, Any], target: str | None = None) -> bool:
    if service.get("healthcheck", {}).get("test"):
        return not service["healthcheck"].get("disable", False)
    return target is not None and stages()[target].healthcheck is not None


def test_expected_services(services: dict[str, Any]) -> None:
    assert {"redis", "postgres", "minio", "minio-bucket", "migrate", "api", "worker", "gc"} <= set(services)


def _s3_bucket(env: dict[str, str]) -> str:
    """The bucket named by DIFFFIT_BLOB_URL's compose default (``${DIFFFIT_BLOB_URL:-s3://b/p}``)."""
    m = re.fullmatch(r"\$\{DIFFFIT_BLOB_URL:-s3://([a-z0-9.-]+)(/[^}]*)?\}", env["DIFFFIT_BLOB_URL"])
    assert m, env["DIFFFIT_BLOB_URL"]
    return m.group(1)


def test_minio_holds_the_blobs_and_its_bucket_is_created_once(services: dict[str, Any]) -> None:
    minio = services["minio"]
    assert minio["image"].split(":")[1].startswith("RELEASE.")  # pinned, not :latest
    assert _command(minio)[:2] == ["server", "/data"]
    assert _volumes(minio)["minio"] == "/data" and _has_healthcheck(minio)
    # Its root user is the AWS_* pair the API and workers sign with.
    env = services["api"]["environment"]
    assert minio["environment"]["MINIO_ROOT_USER"] == env["AWS_ACCESS_KEY_ID"]
    assert minio["environment"]["MINIO_ROOT_PASSWORD"] == env["AWS_SECRET_ACCESS_KEY"]

    bucket = services["minio-bucket"]
    assert bucket["restart"] == "no" and bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(_command(bucket))
    assert f"mc mb --ignore-existing local/{_s3_bucket(env)}" in script
    assert "http://minio:9000" in script and env["DIFFFIT_S3_ENDPOINT_URL"].endswith("-http://minio:9000}")
    # $$ keeps compose from interpolating: the shell reads the container's variables.
    assert "$$AWS_ACCESS_KEY_ID" in script and "$$AWS_SECRET_ACCESS_KEY" in script
    assert bucket["environment"]["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"]
    for name in ("api", *WORKERS, "gc"):
        if name in services:
            cond = services[name]["depends_on"]["minio-bucket"]["condition"]
            assert cond == "service_completed_successfully", name


def test_gc_runs_periodically_against_the_same_store(services: dict[str, Any]) -> None:
    gc = services["gc"]
    cmd = _command(gc)
    assert cmd[:2] == ["difffit", "gc"] and "--every" in cmd
    assert gc["build"]["target"] == "api"  # no torch needed
    assert gc["environment"] == services["api"]["environment"]
    assert gc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_redis_persists_and_is_health_checked(services: dict[str, Any]) -> None:
    redis = services["redis"]
    cmd = _command(redis)
    assert "--appendonly" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    # A broker that evicts keys would drop queued tasks.
    if "--maxmemory-policy" in cmd:
        assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert _has_healthcheck(redis)
    assert _volumes(redis).get("redis") == "/data"


def test_postgres_is_health_checked_with_a_volume(services: dict[str, Any]) -> None:
    pg = services["postgres"]
    assert _has_healthcheck(pg)
    assert _volumes(pg).get("postgres") == "/var/lib/postgresql/data"
    assert pg["environment"]["POSTGRES_DB"]


def test_migrate_is_one_shot_after_postgres(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert " ".join(_command(migrate)).endswith("difffit db upgrade")
    assert migrate["restart"] == "no"  # the string, not YAML's boolean
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["build"]["target"] == "api"  # no torch needed to migrate
    assert migrate["environment"]["DIFFFIT_DATABASE_URL"].startswith("postgresql")


def test_api(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["build"]["target"] == "api"
    assert _has_healthcheck(api, "api")
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    # Stateless: blobs are in the bucket, the registry in PostgreSQL.
    assert not _named_volumes(api)
    assert api["environment"]["DIFFFIT_BLOB_URL"].startswith("${DIFFFIT_BLOB_URL:-s3://")


@pytest.mark.parametrize("name", ("migrate", "api", "gc", *WORKERS))
def test_settings_in_dot_env_reach_the_containers(services: dict[str, Any], name: str) -> None:
    if name not in services:
        pytest.skip(f"no {name} service")
    env_files = services[name].get("env_file", [])
    assert {"path": ".env", "required": False} in env_files, "optional .env, so a fresh checkout starts"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_scale(services: dict[str, Any], name: str) -> None:
    if name not in services:
        pytest.skip(f"no {name} service")
    worker, api = services[name], services["api"]
    assert worker["build"]["target"] == "worker"
    assert _has_healthcheck(worker, "worker")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    if any(d.get("count") == "all" for d in devices):
        # Every replica sees all GPUs; the entrypoint's per-GPU locks must be
        # shared by the replicas of one host to hand each a different GPU.
        assert _volumes(worker)["gpu-locks"] == "/gpu-locks"
        assert "CUDA_VISIBLE_DEVICES" not in worker["environment"]
    # Shares the blob store with the API: the same bucket, endpoint and credentials; no volume.
    env = worker["environment"]
    shared = ("DIFFFIT_REDIS_URL", "DIFFFIT_DATABASE_URL", "DIFFFIT_BLOB_URL", "DIFFFIT_S3_ENDPOINT_URL")
    for key in (*shared, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert env[key] == api["environment"][key], key
    assert env["DIFFFIT_BLOB_URL"].startswith("${DIFFFIT_BLOB_URL:-s3://")
    # Only host-local state is on volumes: the hub cache and the GPU locks.
    assert _named_volumes(worker) <= {"hf-cache", "gpu-locks"}
    assert _volumes(worker).get("hf-cache") == "/data/hf"
    assert env["DIFFFIT_DATABASE_URL"].startswith("postgresql")  # not a per-container SQLite
    # --scale needs replicas that differ in nothing fixed.
    assert "container_name" not in worker
    assert "hostname" not in worker
    for port in worker.get("ports", []):
        spec = port if isinstance(port, str) else str(port.get("published", ""))
        assert ":" not in str(spec) and not (isinstance(port, dict) and port.get("published"))
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_dedicated_train_worker_takes_only_finetune(services: dict[str, Any]) -> None:
    train = services.get("worker-train")
    if train is None:
        pytest.skip("no worker-train service")
    assert train.get("profiles"), "worker-train must stay off unless its profile is named"
    assert train["environment"]["DIFFFIT_QUEUES"] == "finetune"
    assert re.fullmatch(
        r"\$\{DIFFFIT_QUEUES:-generate,finetune\}", services["worker"]["environment"]["DIFFFIT_QUEUES"]
    )


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set().union(*(_named_volumes(s) for s in services.values()))
    assert used <= declared, used - declared
    assert {"redis", "postgres", "minio"} <= declared
    assert "adapters" not in declared  # blobs left the volume for the bucket


def test_prometheus_uses_the_shipped_scrape_config(services: dict[str, Any]) -> None:
    prom = services.get("prometheus")
    if prom is None:
        pytest.skip("no prometheus service")
    assert prom.get("profiles")
    assert _volumes(prom)["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "api:8000" in targets
