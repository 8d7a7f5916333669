"""``POST /generate``: sample images from the base model or a tenant's adapter.

Overload is answered early, never by waiting without bound:

- the generate queue in Redis holds at most ``max_queued_generate`` tasks;
  above that the request is refused with 429 + ``Retry-After`` before
  anything is enqueued;
- at most ``max_waiting_generate`` requests per API process wait for their
  images at once (each holds a thread while it polls); one more is a 429;
- one tenant has at most ``tenant_max_queued_generates`` requests queued or
  running (counted in Redis, across API processes); one more is a 429;
- a wait longer than ``generate_timeout_s`` is a 504 whose ``task_id`` can be
  polled at ``GET /generate/{task_id}``: the task stays queued and its result
  stays readable until the result backend expires it (the worker still drops
  it at its own ``generate_timeout_s``);
- a client that disconnects while waiting has its task cancelled: the worker
  takes it out of the engine's batch at the next step.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from difffit.contract import (
    GENERATE_QUEUE,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    WORKER_STATS_INTERVAL_S,
    AdapterRef,
    GenerateTask,
    SchedulerName,
)
from difffit.errors import InvalidRequest, NotFound, Overloaded
from difffit.logging_setup import bind_log_context
from difffit.settings import Settings
from service.deps import QueueDep, RegistryDep, SettingsDep, TenantDep
from service.errors import problem_responses
from service.generate_wait import queue_and_wait
from service.schemas import GenerateResponse, GenerateStatus

router = APIRouter(tags=["generate"])

#: Retry-After (s) of the 429s: a queue full of generate tasks drains in seconds.
GENERATE_RETRY_AFTER_S = 5
#: Largest class index accepted for the base model while its class names are unknown.
MAX_CLASS_INDEX = 2**31 - 1

_INT = re.compile(r"[+-]?[0-9]+")  # ASCII only: str.isdigit() accepts "²", which int() refuses


def max_waiting(settings: Settings) -> int:
    return settings.max_waiting_generate


class _WaitLimiters:
    """Admission (taken without waiting, or 429) and the threads the waits run in."""

    def __init__(self, capacity: int):
        self.admission = anyio.CapacityLimiter(capacity)
        # Same size as admission, so an admitted request never waits for a thread.
        self.threads = anyio.CapacityLimiter(capacity)


def _wait_limiters(request: Request, settings: Settings) -> _WaitLimiters:
    state = request.app.state
    limiters = getattr(state, "generate_limiters", None)
    if limiters is None:
        limiters = _WaitLimiters(max_waiting(settings))
        state.generate_limiters = limiters
    return limiters


def resolve_class(value: str, class_names: list[str] | None) -> tuple[int, str | None]:
    """Map ``class`` (a name or an index) to ``(index, name)``.

    A name is looked up first (so folder names like "3" mean that folder),
    then an integer index is bound-checked. ``class_names`` None means the
    names are unknown (the base model while no worker is alive): then only an
    index is accepted, which the worker bound-checks.
    """
    value = value.strip()
    if class_names is not None:
        if value in class_names:
            return class_names.index(value), value
        if _is_int(value):
            idx = int(value)
            if 0 <= idx < len(class_names):
                return idx, class_names[idx]
            raise _unknown_class(
                f"class: index {idx} is out of range; this adapter has {len(class_names)} "
                f"classes (0..{len(class_names) - 1}).",
                class_names,
            )
        raise _unknown_class(
            f"class: {value!r} is not a class of this adapter; allowed: {', '.join(class_names)}.",
            class_names,
        )
    if _is_int(value) and 0 <= int(value) <= MAX_CLASS_INDEX:
        return int(value), None
    raise InvalidRequest(
        f"class: no worker is alive to tell the base model's class names, so only a class index "
        f"(an integer from 0) is accepted now, not {value!r}."
    )


def _is_int(value: str) -> bool:
    return len(value) <= 12 and _INT.fullmatch(value) is not None


def _unknown_class(message: str, allowed: list[str]) -> InvalidRequest:
    err = InvalidRequest(message)
    err.problem_extra = {"allowed": list(allowed)}  # type: ignore[attr-defined]
    return err


def prefers_json(accept: str | None) -> bool:
    """True when the Accept header asks for JSON at least as much as for a PNG."""
    if not accept:
        return False
    q_json = 0.0
    q_png = -1.0  # not asked for explicitly
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if media in ("application/json", "application/*"):
            q_json = max(q_json, q)
        elif media in ("image/png", "image/*"):
            q_png = max(q_png, q)
    return q_json > 0 and q_json >= q_png


def base_class_names(queue: Any) -> list[str] | None:
    """The base model's class names from the first live worker (by hostname), None if unknown.

    Every worker serving one base publishes the same names; the read is
    cached for one stats interval so requests do not each SCAN Redis.
    """
    for worker in queue.live_workers(max_age_s=WORKER_STATS_INTERVAL_S):
        if worker.class_names:
            return list(worker.class_names)
    return None


def base_resolution(queue: Any) -> int | None:
    """The base model's image side from the first live worker, None if unknown."""
    for worker in queue.live_workers(max_age_s=WORKER_STATS_INTERVAL_S):
        if worker.resolution:
            return int(worker.resolution)
    return None


def check_resolution(requested: int | None, allowed: int | None, who: str) -> int | None:
    """The side to sample at: the adapter version's trained one, or the base's for the base.

    Any other side is a 422 naming the allowed value. ``allowed`` None (the base
    while no worker is alive) passes the request on; the worker checks it.
    """
    if requested is None or allowed is None or requested == allowed:
        return allowed if requested is None else requested
    err = InvalidRequest(
        f"resolution: {who} samples at {allowed} px, the resolution it was trained at; got {requested}. "
        f"Allowed values: {allowed}."
    )
    err.problem_extra = {"allowed": [allowed]}  # type: ignore[attr-defined]
    raise err


def _resolve(
    registry: Any,
    queue: Any,
    tenant_id: Any,
    adapter: str | None,
    version: int | None,
    cls: str,
    resolution: int | None,
) -> tuple[AdapterRef | None, int, str | None, int | None, int | None]:
    if adapter is None:
        if version is not None:
            raise InvalidRequest("version: only valid together with adapter.")
        idx, name = resolve_class(cls, base_class_names(queue))
        return None, idx, name, None, check_resolution(resolution, base_resolution(queue), "the base model")
    v = registry.get_version(tenant_id, adapter, version)
    idx, name = resolve_class(cls, list(v.class_names or []))
    ref = AdapterRef(name=adapter, version=v.version, sha256=v.sha256, tenant_id=tenant_id)
    who = f"adapter {adapter!r} version {v.version}"
    return ref, idx, name, v.version, check_resolution(resolution, v.resolution, who)


async def sample(
    request: Request,
    tenant: Any,
    registry: Any,
    queue: Any,
    settings: Settings,
    class_: str,
    adapter: str | None,
    version: int | None,
    n: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    scheduler: str,
    resolution: int | None = None,
) -> tuple[GenerateTask, AdapterRef | None, int, str | None, int | None, Any]:
    """Check limits, resolve adapter and class, queue the task and wait for its images.

    Shared by ``POST /generate`` and the OpenAI-compatible route. `resolution`
    None samples at the model's own (the version's trained one, the base's for
    the base); the task carries the side used. Returns the task, the adapter
    ref (None: base), the class index and name, the version and the
    :class:`difffit.contract.GenerateResult`.
    """
    if n > settings.max_images_per_request:
        raise InvalidRequest(f"n: {n} is above this server's limit of {settings.max_images_per_request}.")
    if steps > settings.max_sampling_steps:
        raise InvalidRequest(f"steps: {steps} is above this server's limit of {settings.max_sampling_steps}.")
    ref, idx, class_name, resolved_version, side = await run_in_threadpool(
        _resolve, registry, queue, tenant.id, adapter, version, class_, resolution
    )
    task = GenerateTask(
        request_id=f"{tenant.id}-{uuid.uuid4().hex}",
        tenant=str(tenant.id),
        adapter=ref,
        class_labels=[idx] * n,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        resolution=side,
    )
    bind_log_context(task_id=task.request_id)
    limiters = _wait_limiters(request, settings)
    try:
        limiters.admission.acquire_nowait()
    except anyio.WouldBlock:
        raise Overloaded(
            f"{max_waiting(settings)} generate requests are already waiting on this server; retry shortly.",
            retry_after_s=GENERATE_RETRY_AFTER_S,
        ) from None
    try:
        await run_in_threadpool(
            queue.check_backlog,
            GENERATE_QUEUE,
            settings.max_queued_generate,
            GENERATE_RETRY_AFTER_S,
        )
        result = await queue_and_wait(
            request, queue, task, settings, limiters.threads, GENERATE_RETRY_AFTER_S
        )
    finally:
        limiters.admission.release()
    return task, ref, idx, class_name, resolved_version, result


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate images of one class",
    description="Samples `n` images of class `class` (an index, or a class name of the adapter) "
    "from the adapter's latest version (or `version`), or from the base model when `adapter` "
    "is omitted (base class names come from the live workers; with none alive only an index "
    "is accepted). Images are `resolution` px square: the adapter version's trained resolution "
    "(a 512 fine-tune samples at 512), the base's for the base; another value is a 422 naming "
    "the allowed one. Answers `image/png` when n = 1 unless the Accept header prefers "
    "`application/json`; otherwise JSON with base64 PNGs. A request still running after the "
    "server's timeout gets a 504 problem whose `task_id` can be polled at "
    "`GET /generate/{task_id}`. 429 (with `Retry-After`) when the generate queue, this "
    "server's waiting requests or the tenant's queued generates are at their limits. A client "
    "that disconnects cancels its request. The task id is also in `X-Task-Id`.",
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "A PNG (n = 1) or JSON.",
        }
    }
    | problem_responses(401, 404, 422, 429, 503, 504),
)
async def generate(
    request: Request,
    tenant: TenantDep,
    registry: RegistryDep,
    queue: QueueDep,
    settings: SettingsDep,
    class_: Annotated[
        str,
        Query(alias="class", min_length=1, max_length=256, description="Class index or name."),
    ],
    adapter: Annotated[
        str | None,
        Query(
            max_length=NAME_MAX_LENGTH,
            pattern=NAME_PATTERN,
            description="Adapter name; omit for the base model.",
        ),
    ] = None,
    version: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Adapter version; default latest.")
    ] = None,
    n: Annotated[int, Query(ge=1, description="Number of images.")] = 1,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1)] = 0,
    steps: Annotated[int, Query(ge=1, description="Sampling steps.")] = 50,
    guidance_scale: Annotated[float, Query(ge=1.0, le=50.0)] = 4.0,
    scheduler: SchedulerName = "ddim",
    resolution: Annotated[
        int | None,
        Query(
            ge=8,
            le=4096,
            description="Image side in pixels; default (and only allowed value) the adapter version's "
            "trained resolution, or the base model's for the base.",
        ),
    ] = None,
) -> Any:
    task, ref, idx, class_name, resolved_version, result = await sample(
        request,
        tenant,
        registry,
        queue,
        settings,
        class_,
        adapter,
        version,
        n,
        seed,
        steps,
        guidance_scale,
        scheduler,
        resolution,
    )
    side = task.resolution
    headers = {
        "X-Task-Id": task.request_id,
        "X-Class": str(idx),
        "X-Seconds": f"{result.seconds:.3f}",
    }
    if ref is not None:
        headers["X-Adapter"] = ref.name
        headers["X-Adapter-Version"] = str(ref.version)
    if n == 1 and len(result.images_png_b64) == 1 and not prefers_json(request.headers.get("accept")):
        png = base64.b64decode(result.images_png_b64[0])
        return Response(content=png, media_type="image/png", headers=headers)
    body = GenerateResponse(
        request_id=task.request_id,
        images=result.images_png_b64,
        adapter=ref.name if ref else None,
        version=resolved_version,
        class_=idx,
        class_name=class_name,
        n=n,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        resolution=side,
        seconds=result.seconds,
    )
    return JSONResponse(body.model_dump(mode="json", by_alias=True), headers=headers)


@router.get(
    "/generate/{request_id}",
    response_model=GenerateStatus,
    summary="Poll a generate request that outlived its HTTP wait",
    description="`state` is `pending` until the images are ready (unknown ids also read as "
    "pending, as results expire). Results can be read until they expire.",
    responses=problem_responses(401, 404, 503),
)
def poll_generate(request_id: str, tenant: TenantDep, queue: QueueDep) -> GenerateStatus:
    if not request_id.startswith(f"{tenant.id}-"):
        raise NotFound(f"No generate request {request_id!r} for this tenant.")
    bind_log_context(task_id=request_id)
    result = queue.poll_generate(request_id)
    if result is None:
        return GenerateStatus(request_id=request_id, state="pending")
    return GenerateStatus(
        request_id=request_id,
        state="succeeded",
        images=result.images_png_b64,
        seconds=result.seconds,
    )
