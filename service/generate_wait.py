"""A generate's life at the API after its checks: counted for its tenant, queued, waited for.

- The task counts against its tenant's ``tenant_max_queued_generates`` (in
  Redis, across API processes) from before it is queued until its wait ends;
  after a 504 it keeps counting until the worker's own timeout could end it
  too (the entry's hold), since it is still queued or running.
- The wait runs in a thread; beside it the event loop checks every
  ``DISCONNECT_POLL_S`` whether the HTTP client is still there. When it has
  gone the wait stops and the task is flagged as cancelled (the worker takes
  it out of the engine's batch at the next step).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from difffit.contract import GenerateTask
from difffit.errors import GenerationCancelled, GenerationTimeout
from difffit.settings import Settings

#: How often a waiting request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.5


async def queue_and_wait(
    request: Request, queue: Any, task: GenerateTask, settings: Settings, threads: Any, retry_after_s: int
) -> Any:
    """Count, enqueue and wait for ``task``; its GenerateResult (or the domain error)."""
    hold_s = 2 * settings.generate_timeout_s + 60
    limit = settings.tenant_max_queued_generates
    await run_in_threadpool(
        queue.admit_tenant_generate, task.tenant, task.request_id, limit, hold_s, retry_after_s
    )
    try:
        handle = await run_in_threadpool(queue.enqueue_generate, task)
        result = await _wait_while_connected(request, queue, handle, settings, threads)
    except GenerationCancelled:
        await run_in_threadpool(queue.cancel_generate, task.request_id)
        await run_in_threadpool(queue.release_tenant_generate, task.tenant, task.request_id)
        raise
    except GenerationTimeout:
        raise  # still queued or running: it keeps counting until its entry's hold ends
    except BaseException:
        await run_in_threadpool(queue.release_tenant_generate, task.tenant, task.request_id)
        raise
    await run_in_threadpool(queue.release_tenant_generate, task.tenant, task.request_id)
    return result


async def _wait_while_connected(
    request: Request, queue: Any, handle: Any, settings: Settings, threads: Any
) -> Any:
    """The task's result; GenerationCancelled when the HTTP client disconnects first."""
    gone = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        gone.set()

    wait = functools.partial(queue.wait_generate, handle, settings.generate_timeout_s, stop=gone)
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            result = await anyio.to_thread.run_sync(wait, limiter=threads)
        except Exception as exc:  # noqa: BLE001 - raised below, not wrapped in an ExceptionGroup
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result
