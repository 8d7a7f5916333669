"""Fine-tuning jobs: list, read, cancel, follow (server-sent events)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from difffit.contract import TERMINAL_JOB_STATES, JobState
from difffit.errors import JobNotFound, NotFound
from difffit.logging_setup import bind_log_context
from service.deps import BlobStoreDep, RegistryDep, TenantDep
from service.errors import problem_responses
from service.schemas import Job, JobError, JobList, JobProgress

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: Seconds between polls of the registry for new job events.
EVENT_POLL_S = 0.5
#: Largest event id accepted (SQL BIGINT); a bigger one cannot exist.
MAX_EVENT_ID = 2**63 - 1
#: Job ids are uuid4 hex; anything unlike an id is not looked up (a NUL byte or a
#: megabyte of text would reach the database driver otherwise).
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _job_id(job_id: str) -> str:
    """The job id, bound to the log context; 404 for strings that cannot be one."""
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFound(f"job {job_id[:64]!r} not found")
    bind_log_context(job_id=job_id)
    return job_id


def job_out(job: Any) -> Job:
    """The API view of a registry ``JobRecord``."""
    error = None
    if job.error_code:
        error = JobError(code=job.error_code, message=job.error_message or "")
    return Job(
        id=str(job.id),
        adapter=job.adapter_name,
        state=job.state,
        progress=JobProgress(
            step=job.step or 0,
            total=job.total_steps or 0,
            loss=job.loss,
            eta_s=job.eta_s,
        ),
        error=error,
        adapter_version=job.adapter_version,
        cancel_requested=bool(job.cancel_requested),
        attempts=job.attempts or 0,
        request=dict(job.request or {}),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.get(
    "",
    response_model=JobList,
    summary="List the tenant's jobs, newest first",
    responses=problem_responses(401, 422),
)
def list_jobs(
    tenant: TenantDep,
    registry: RegistryDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    state: JobState | None = None,
) -> JobList:
    jobs = registry.list_jobs(tenant.id, limit=limit, state=state)
    return JobList(jobs=[job_out(j) for j in jobs])


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Read one job: state, progress, error, resulting adapter version",
    responses=problem_responses(401, 404),
)
def get_job(job_id: str, tenant: TenantDep, registry: RegistryDep) -> Job:
    return job_out(registry.get_job(tenant.id, _job_id(job_id)))


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    status_code=202,
    summary="Ask a job to stop",
    description="202 while the worker still has to notice the flag (checked every step); "
    "200 when the job is already terminal (cancelled, succeeded or failed).",
    responses={200: {"model": Job, "description": "The job is already terminal."}}
    | problem_responses(401, 404),
)
def cancel_job(job_id: str, tenant: TenantDep, registry: RegistryDep, response: Response) -> Job:
    job = registry.request_cancel(tenant.id, _job_id(job_id))
    if job.state in TERMINAL_JOB_STATES:
        response.status_code = 200
    return job_out(job)


@router.get(
    "/{job_id}/events",
    summary="Follow a job as server-sent events",
    description="Replays the job's events, then streams new ones until the job is terminal. "
    "Each event is `event: <kind>` with JSON `data` and the event id as `id` (send it back "
    "as `Last-Event-ID` to resume). The stream ends with `event: end` whose data is the job.",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Event stream."}}
    | problem_responses(401, 404),
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    registry: RegistryDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_EVENT_ID, description="Only events after this id.")
    ] = None,
) -> EventSourceResponse:
    job_id = _job_id(job_id)
    job = await run_in_threadpool(registry.get_job, tenant.id, job_id)  # 404 before streaming
    start = after if after is not None else _parse_event_id(last_event_id)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        nonlocal job
        last_id = start
        while True:
            events = await run_in_threadpool(registry.job_events, job.id, last_id)
            for ev in events:
                last_id = max(last_id, int(ev.id))
                yield ServerSentEvent(
                    data=json.dumps(ev.data if ev.data is not None else {}, default=str),
                    event=ev.kind,
                    id=str(ev.id),
                )
            if job.state in TERMINAL_JOB_STATES:
                # One more read above happened after the state turned terminal: done.
                yield ServerSentEvent(data=job_out(job).model_dump_json(), event="end")
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(EVENT_POLL_S)
            job = await run_in_threadpool(registry.get_job, tenant.id, job_id)

    return EventSourceResponse(stream(), ping=15)


@router.get(
    "/{job_id}/previews/{sha256}",
    response_class=Response,
    summary="A preview grid of a job (from a `preview` event)",
    description="The PNG a `preview` event of the job names (`url`); only those are served.",
    responses={200: {"content": {"image/png": {}}}} | problem_responses(401, 404),
)
def get_preview(
    job_id: str, sha256: str, tenant: TenantDep, registry: RegistryDep, blobs: BlobStoreDep
) -> Response:
    job = registry.get_job(tenant.id, _job_id(job_id))
    named = any(
        ev.kind == "preview" and (ev.data or {}).get("sha256") == sha256 for ev in registry.job_events(job.id)
    )
    if not named:
        raise NotFound(f"job {job_id} has no preview {sha256[:64]!r}")
    return Response(content=blobs.get_bytes(sha256), media_type="image/png")


def _parse_event_id(value: str | None) -> int:
    try:
        return min(max(0, int(value)), MAX_EVENT_ID) if value else 0
    except ValueError:
        return 0
