"""service.queue.QueueClient against a real redis-server (no worker: results are
written the way a worker's result backend writes them)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from difffit import contract
from difffit import errors as E
from difffit.settings import Settings
from launch.embedded import free_port, start_redis, stop_process
from service.queue import QueueClient

from .conftest import publish_worker, worker_stats


@pytest.fixture
def queue(redis_url, tmp_path) -> Iterator[QueueClient]:
    redis.Redis.from_url(redis_url).flushdb()
    q = QueueClient(Settings(data_dir=tmp_path, redis_url=redis_url))
    yield q
    q.close()


def _task(rid: str = "1-abc", n: int = 2) -> contract.GenerateTask:
    ref = contract.AdapterRef(name="fungi", version=3, sha256="c" * 64)
    return contract.GenerateTask(request_id=rid, adapter=ref, class_labels=[4] * n, seed=9)


def _queued_messages(redis_url: str, queue_name: str) -> list[dict]:
    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in r.lrange(queue_name, 0, -1):
        msg = json.loads(raw)
        body = json.loads(base64.b64decode(msg["body"]))
        out.append({"headers": msg["headers"], "args": body[0], "kwargs": body[1]})
    return out


def test_enqueue_generate_by_name_on_generate_queue(queue, redis_url):
    task = _task()
    handle = queue.enqueue_generate(task)
    assert handle.id == task.request_id
    (msg,) = _queued_messages(redis_url, contract.GENERATE_QUEUE)
    assert msg["headers"]["task"] == contract.GENERATE_TASK
    assert msg["headers"]["id"] == task.request_id
    assert msg["args"] == [task.model_dump(mode="json")]
    assert msg["headers"]["expires"]  # dropped by a worker that gets it after nobody waits
    assert _queued_messages(redis_url, contract.FINETUNE_QUEUE) == []


def test_enqueue_finetune_task_id_is_job_id(queue, redis_url):
    queue.enqueue_finetune("job123")
    (msg,) = _queued_messages(redis_url, contract.FINETUNE_QUEUE)
    assert msg["headers"]["task"] == contract.FINETUNE_TASK
    assert msg["headers"]["id"] == "job123"
    assert msg["args"] == [{"job_id": "job123"}]


def _complete_later(queue: QueueClient, task_id: str, value, state="SUCCESS", delay=0.2):
    def run():
        time.sleep(delay)
        queue.celery.backend.store_result(task_id, value, state)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_wait_generate_returns_result_and_forgets(queue, redis_url):
    handle = queue.enqueue_generate(_task("1-ok"))
    result = {"images_png_b64": ["aGk=", "aGk="], "seconds": 1.5, "batch_sizes": [2]}
    t = _complete_later(queue, handle.id, {"ok": True, "result": result})
    got = queue.wait_generate(handle, timeout=5)
    t.join()
    assert got == contract.GenerateResult(**result)
    assert redis.Redis.from_url(redis_url).exists(f"celery-task-meta-{handle.id}") == 0


def test_wait_generate_rebuilds_worker_errors(queue):
    handle = queue.enqueue_generate(_task("1-err"))
    err = {"code": "incompatible-adapter", "message": "other base"}
    _complete_later(queue, handle.id, {"ok": False, "error": err}, delay=0).join()
    with pytest.raises(E.IncompatibleAdapter, match="other base"):
        queue.wait_generate(handle, timeout=5)


def test_wait_generate_task_crash_is_internal(queue):
    handle = queue.enqueue_generate(_task("1-crash"))
    _complete_later(queue, handle.id, ValueError("boom"), state="FAILURE", delay=0).join()
    with pytest.raises(E.DiffFitError) as info:
        queue.wait_generate(handle, timeout=5)
    assert info.value.code == "internal"


def test_expired_request_is_backend_unavailable(queue):
    handle = queue.enqueue_generate(_task("1-expired"))
    _complete_later(queue, handle.id, None, state="REVOKED", delay=0).join()
    with pytest.raises(E.BackendUnavailable, match="expired"):
        queue.wait_generate(handle, timeout=5)


def test_wait_generate_timeout_carries_task_id(queue):
    handle = queue.enqueue_generate(_task("1-slow"))
    t0 = time.monotonic()
    with pytest.raises(E.GenerationTimeout) as info:
        queue.wait_generate(handle, timeout=0.3)
    assert info.value.task_id == "1-slow"
    assert time.monotonic() - t0 < 2
    assert queue.poll_generate("1-slow") is None


def test_ping(queue):
    queue.ping()


def test_redis_down_is_backend_unavailable(tmp_path):
    q = QueueClient(Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    t0 = time.monotonic()
    with pytest.raises(E.BackendUnavailable):
        q.ping()
    with pytest.raises(E.BackendUnavailable):
        q.enqueue_finetune("j1")
    with pytest.raises(E.BackendUnavailable):
        q.poll_generate("1-x")
    assert time.monotonic() - t0 < 10
    q.close()


def test_client_recovers_after_a_redis_outage(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_redis(port, tmp_path / "r", persistent=False)
    q = QueueClient(Settings(data_dir=tmp_path, redis_url=url))
    try:
        q.enqueue_finetune("before")
        stop_process(proc, timeout_s=5)
        with pytest.raises(E.BackendUnavailable):
            q.enqueue_finetune("during")
        with pytest.raises(E.BackendUnavailable):
            q.wait_generate("1-x", timeout=1)
        proc = start_redis(port, tmp_path / "r", persistent=False)
        q.enqueue_finetune("after")
        handle = q.enqueue_generate(_task("1-after"))
        q.celery.backend.store_result(
            handle.id, {"ok": True, "result": {"images_png_b64": [], "seconds": 0.1}}, "SUCCESS"
        )
        assert q.wait_generate(handle, timeout=5).seconds == 0.1
        assert [m["headers"]["id"] for m in _queued_messages(url, contract.FINETUNE_QUEUE)] == ["after"]
    finally:
        q.close()
        stop_process(proc, timeout_s=5)


def test_queue_depth_counts_every_priority_list(queue, redis_url):
    r = redis.Redis.from_url(redis_url)
    assert queue.queue_depth(contract.GENERATE_QUEUE) == 0
    queue.enqueue_generate(_task("1-a"))
    queue.enqueue_generate(_task("1-b"))
    r.lpush(contract.GENERATE_QUEUE + "\x06\x163", b"{}")  # a priority-3 message, kombu's naming
    assert queue.queue_depth(contract.GENERATE_QUEUE) == 3
    assert queue.queue_depth(contract.FINETUNE_QUEUE) == 0


def test_check_backlog_refuses_at_the_limit(queue):
    queue.enqueue_finetune("j1")
    assert queue.check_backlog(contract.FINETUNE_QUEUE, limit=2, retry_after_s=7) == 1
    queue.enqueue_finetune("j2")
    with pytest.raises(E.Overloaded) as info:
        queue.check_backlog(contract.FINETUNE_QUEUE, limit=2, retry_after_s=7)
    assert info.value.retry_after_s == 7


def test_live_workers_reads_stats_keys(queue, redis_url):
    r = redis.Redis.from_url(redis_url)
    assert queue.live_workers() == []
    publish_worker(r, worker_stats("w-b", hits=2))
    publish_worker(r, worker_stats("w-a", hits=1))
    r.set(contract.WORKER_STATS_KEY.format("broken"), b"not json", ex=60)  # ignored, not fatal
    workers = queue.live_workers()
    assert [(w.hostname, w.hits) for w in workers] == [("w-a", 1), ("w-b", 2)]
    # A cached read is reused only when asked for; a fresh read sees the key expire/vanish.
    r.delete(contract.WORKER_STATS_KEY.format("w-a"))
    assert len(queue.live_workers(max_age_s=60)) == 2
    assert [w.hostname for w in queue.live_workers()] == ["w-b"]
