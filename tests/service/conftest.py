"""Fixtures for the HTTP service tests.

A real registry on SQLite in tmp_path with two tenants, the app from
``create_app`` and the Celery queue replaced by :class:`FakeQueue` through
``app.dependency_overrides[get_queue]``. The real queue path is covered by
``test_api_queue.py``, ``test_api_overload.py`` and ``test_api_faults.py``
(against a real redis-server: the ``redis_url`` fixture) and the end-to-end
tests.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_store import Registry, TenantRecord, VersionRecord
from difffit.contract import WORKER_STATS_KEY, GenerateResult, GenerateTask, WorkerStats
from difffit.errors import BackendUnavailable, Overloaded
from difffit.settings import Settings
from launch.embedded import free_port, start_redis, stop_process
from service.deps import get_queue
from service.main import create_app
from service.queue import QueueClient

#: The bundled base model's classes, as its workers publish them.
BASE_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip


def worker_stats(hostname: str = "worker-1", **fields: Any) -> WorkerStats:
    """A live worker's stats as it would publish them."""
    fields.setdefault("class_names", list(BASE_CLASSES))
    fields.setdefault("queues", ["generate", "finetune"])
    return WorkerStats(hostname=hostname, **fields)


def tiny_png(value: int = 0) -> bytes:
    """A valid 1x1 grey PNG (no Pillow needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = zlib.compress(bytes([0, value & 0xFF]))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the module (flush it in tests that need it empty)."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"), persistent=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc, timeout_s=5)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A client of the module's redis-server, emptied first."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.close()


def publish_worker(redis_client: Any, stats: WorkerStats | None = None, ttl_s: int = 60) -> WorkerStats:
    """Write a worker's stats key the way a live worker does."""
    stats = stats or worker_stats()
    redis_client.set(WORKER_STATS_KEY.format(stats.hostname), stats.model_dump_json(), ex=ttl_s)
    return stats


@dataclass
class FakeHandle:
    id: str


@dataclass
class FakeQueue:
    """Stands in for service.queue.QueueClient (enqueue/wait/poll, ping, depths, workers)."""

    generated: list[GenerateTask] = field(default_factory=list)
    finetunes: list[str] = field(default_factory=list)
    #: Called with the task; returns a GenerateResult or raises a domain error.
    on_generate: Callable[[GenerateTask], GenerateResult] | None = None
    down: bool = False
    #: Messages waiting per queue, as LLEN would tell.
    depths: dict[str, int] = field(default_factory=dict)
    #: The live workers (one serving the bundled base by default).
    workers: list[WorkerStats] = field(default_factory=lambda: [worker_stats()])
    #: Per tenant, the generate task ids counted against it (admit/release).
    tenant_generates: dict[str, set[str]] = field(default_factory=dict)
    #: Task ids the API flagged as cancelled (their client went away).
    cancelled: list[str] = field(default_factory=list)

    def enqueue_generate(self, task: GenerateTask) -> FakeHandle:
        if self.down:
            raise BackendUnavailable("redis down")
        self.generated.append(task)
        return FakeHandle(task.request_id)

    def wait_generate(self, handle: FakeHandle, timeout: float, stop: Any = None) -> GenerateResult:
        task = next(t for t in self.generated if t.request_id == handle.id)
        if self.on_generate is not None:
            return self.on_generate(task)
        images = [base64.b64encode(tiny_png(c)).decode() for c in task.class_labels]
        return GenerateResult(images_png_b64=images, seconds=0.25, batch_sizes=[len(images)])

    def poll_generate(self, task_id: str) -> GenerateResult | None:
        return None

    def admit_tenant_generate(
        self, tenant: str, task_id: str, limit: int, hold_s: float, retry_after_s: int
    ) -> None:
        held = self.tenant_generates.setdefault(tenant, set())
        if len(held) >= limit:
            raise Overloaded(
                f"tenant limit (DIFFFIT_TENANT_MAX_QUEUED_GENERATES={limit})", retry_after_s=retry_after_s
            )
        held.add(task_id)

    def release_tenant_generate(self, tenant: str, task_id: str) -> None:
        self.tenant_generates.get(tenant, set()).discard(task_id)

    def cancel_generate(self, task_id: str) -> None:
        self.cancelled.append(task_id)

    def enqueue_finetune(self, job_id: str) -> None:
        if self.down:
            raise BackendUnavailable("redis down")
        self.finetunes.append(job_id)

    def ping(self) -> None:
        if self.down:
            raise BackendUnavailable("redis down")

    def queue_depth(self, queue: str) -> int:
        if self.down:
            raise BackendUnavailable("redis down")
        return self.depths.get(queue, 0)

    # The real threshold logic, on top of the fake depths.
    check_backlog = QueueClient.check_backlog

    def live_workers(self, max_age_s: float = 0.0) -> list[WorkerStats]:
        if self.down:
            raise BackendUnavailable("redis down")
        return list(self.workers)


@dataclass
class Tenant:
    record: TenantRecord
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:9/0",  # nothing listens: the fake queue is used
        generate_timeout_s=5.0,
        max_images_per_request=4,
        max_sampling_steps=100,
        max_finetune_steps=1000,
        allow_file_urls=False,
    )


@pytest.fixture
def registry(settings: Settings) -> Iterator[Registry]:
    reg = Registry.from_settings(settings)
    reg.create_schema()
    yield reg
    reg.close()


def _tenant(registry: Registry, name: str) -> Tenant:
    record = registry.create_tenant(name)
    return Tenant(record, registry.create_api_key(name))


@pytest.fixture
def acme(registry: Registry) -> Tenant:
    return _tenant(registry, "acme")


@pytest.fixture
def other(registry: Registry) -> Tenant:
    return _tenant(registry, "other")


@pytest.fixture
def fake_queue() -> FakeQueue:
    return FakeQueue()


def _make_client(settings: Settings, registry: Registry, queue: Any, **kw: Any) -> TestClient:
    app = create_app(settings)
    app.state.registry = registry
    app.dependency_overrides[get_queue] = lambda: queue
    return TestClient(app, **kw)


@pytest.fixture
def make_client() -> Callable[..., TestClient]:
    """``make_client(settings, registry, queue, **TestClient kwargs)``."""
    return _make_client


@pytest.fixture
def client(settings: Settings, registry: Registry, fake_queue: FakeQueue) -> Iterator[TestClient]:
    with _make_client(settings, registry, fake_queue) as c:
        yield c


FUNGI_CLASSES = ["amanita", "boletus", "chanterelle"]


def _add_version(
    registry: Registry, tenant: Tenant, name: str = "fungi", classes: list[str] | None = None
) -> VersionRecord:
    """Register an adapter version (the blob itself is not needed by the service)."""
    n = len(registry.list_adapters(tenant.record.id))
    return registry.add_version(
        tenant.record.id,
        name,
        sha256=f"{n + 1:064x}",
        size_bytes=1234,
        method="difffit",
        base_model_hash="b" * 64,
        class_names=list(classes or FUNGI_CLASSES),
        resolution=32,
        trainable_params=4321,
        metadata={"note": "test"},
        files={},
    )


@pytest.fixture
def add_version(registry: Registry) -> Callable[..., VersionRecord]:
    """``add_version(tenant, name="fungi", classes=None)`` registers a new version."""
    return lambda tenant, name="fungi", classes=None: _add_version(registry, tenant, name, classes)


def _assert_problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    """The response is problem+json with the given status and stable type."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["type"] == f"https://difffit.dev/problems/{code}"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


@pytest.fixture
def assert_problem() -> Callable[[Any, int, str], dict[str, Any]]:
    """``assert_problem(resp, status, code)`` -> the problem body."""
    return _assert_problem
