"""Fine-tuning jobs: creation with idempotency keys, progress, cancel, events."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adapters_store.db import Database
from adapters_store.models import Job, JobEventRow, Tenant, utcnow
from adapters_store.records import JobEvent, JobRecord
from adapters_store.registry_blobs import lock_blob_refs
from adapters_store.registry_tenants import validate_name
from adapters_store.registry_webhooks import enqueue_terminal_webhook
from difffit.contract import TERMINAL_JOB_STATES, JobState
from difffit.errors import Conflict, InvalidRequest, JobNotFound, TenantNotFound

JOB_STATES: tuple[str, ...] = get_args(JobState)

# Identity and the original request are fixed at creation; everything a
# worker reports afterwards is updatable. Types are checked up front so a bad
# value is an InvalidRequest naming the field, not a backend-specific error.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "step": (int,),
    "total_steps": (int,),
    "loss": (float, int),
    "eta_s": (float, int),
    "error_code": (str,),
    "error_message": (str,),
    "adapter_version": (int,),
    "attempts": (int,),
    "cancel_requested": (bool,),
    "checkpoint_sha256": (str,),
    "checkpoint_step": (int,),
    "started_at": (datetime,),
    "finished_at": (datetime,),
}
_NOT_NULL = frozenset({"state", "step", "total_steps", "attempts", "cancel_requested"})
UPDATABLE_JOB_FIELDS = frozenset(_FIELD_TYPES)
MAX_LIST_LIMIT = 1000


def _normalise_json(value: Any, what: str) -> Any:
    """Round-trip through JSON so stored and incoming values compare equal."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} is not JSON-serialisable: {exc}") from exc


def _check_state(state: Any) -> str:
    if state not in JOB_STATES:
        raise InvalidRequest(f"unknown job state {state!r}; expected one of {', '.join(JOB_STATES)}")
    return state


def job_record(row: Job) -> JobRecord:
    """Build the record of a job row."""
    return JobRecord.model_validate(row)


def _event_record(row: JobEventRow) -> JobEvent:
    return JobEvent.model_validate(row)


def _job_row(s: Session, job_id: str, tenant_id: int | None = None, lock: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        # Other tenants' jobs read as missing: existence is never revealed.
        query = query.where(Job.tenant_id == tenant_id)
    if lock:
        query = query.with_for_update()
    row = s.scalar(query)
    if row is None:
        raise JobNotFound(f"job {job_id!r} not found")
    return row


class JobOps:
    """Registry methods for jobs and their event logs."""

    _db: Database

    def create_job(
        self,
        tenant_id: int,
        adapter_name: str,
        request: dict[str, Any],
        total_steps: int,
        idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create a queued job; return (job, created).

        With an idempotency key already used by this tenant, the existing
        job comes back with created=False, or Conflict when the request
        differs from the one stored under that key.
        """
        validate_name(adapter_name, "adapter")
        if not isinstance(request, dict):
            raise InvalidRequest("job request must be a JSON object")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise InvalidRequest(f"total_steps must be a positive integer, got {total_steps!r}")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise InvalidRequest("idempotency key must be 1 to 255 characters")
        body = _normalise_json(request, "job request")

        def fn(s: Session) -> tuple[JobRecord, bool]:
            if s.get(Tenant, tenant_id) is None:
                raise TenantNotFound(f"tenant id {tenant_id} not found")
            if idempotency_key is not None:
                existing = s.scalar(
                    select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
                )
                if existing is not None:
                    if existing.request != body or existing.adapter_name != adapter_name:
                        raise Conflict(
                            f"idempotency key {idempotency_key!r} was already used for job "
                            f"{existing.id} with a different request"
                        )
                    return job_record(existing), False
            now = utcnow()
            row = Job(
                id=uuid.uuid4().hex,
                tenant_id=tenant_id,
                adapter_name=adapter_name,
                request=body,
                idempotency_key=idempotency_key,
                state="queued",
                step=0,
                total_steps=total_steps,
                attempts=0,
                cancel_requested=False,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.flush()
            return job_record(row), True

        return self._db.write(fn)

    def get_job(self, tenant_id: int, job_id: str) -> JobRecord:
        """A job of the tenant; JobNotFound otherwise (also for other tenants' jobs)."""
        return self._db.read(lambda s: job_record(_job_row(s, job_id, tenant_id)))

    def get_job_unscoped(self, job_id: str) -> JobRecord:
        """A job by id regardless of tenant, for workers."""
        return self._db.read(lambda s: job_record(_job_row(s, job_id)))

    def list_jobs(self, tenant_id: int, limit: int = 50, state: str | None = None) -> list[JobRecord]:
        """The tenant's jobs, newest first, optionally only those in `state`."""
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit!r}")
        if state is not None:
            _check_state(state)

        def fn(s: Session) -> list[JobRecord]:
            query = select(Job).where(Job.tenant_id == tenant_id)
            if state is not None:
                query = query.where(Job.state == state)
            query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            return [job_record(r) for r in s.scalars(query)]

        return self._db.read(fn)

    def update_job(
        self, job_id: str, *, event: tuple[str, dict[str, Any]] | None = None, **fields: Any
    ) -> JobRecord:
        """Update a job's progress or outcome and return the new record.

        `event` (kind, data) is appended in the same transaction when the update
        applies: a reader that sees the terminal state also sees its event (the
        event stream ends at the first read of a terminal state).

        Only the fields in UPDATABLE_JOB_FIELDS are accepted. A job in a
        terminal state is never changed (the unchanged record is returned),
        so a late progress report cannot revive a cancelled job. Entering
        `running` stamps started_at and entering a terminal state stamps
        finished_at unless the caller passes them.
        """
        unknown = set(fields) - UPDATABLE_JOB_FIELDS
        if unknown:
            raise InvalidRequest(
                f"cannot update job field(s) {', '.join(sorted(unknown))}; "
                f"updatable: {', '.join(sorted(UPDATABLE_JOB_FIELDS))}"
            )
        for name, value in fields.items():
            if value is None and name not in _NOT_NULL:
                continue
            if not isinstance(value, _FIELD_TYPES[name]) or (
                isinstance(value, bool) and bool not in _FIELD_TYPES[name]
            ):
                raise InvalidRequest(f"job field {name} got {value!r} of the wrong type")
        if "state" in fields:
            _check_state(fields["state"])

        adds_reference = fields.get("checkpoint_sha256") is not None
        if event is not None:
            if not event[0]:
                raise InvalidRequest("event kind must be a non-empty string")
            event_data = _normalise_json(event[1], f"data of job event {event[0]!r}")

        def fn(s: Session) -> JobRecord:
            if adds_reference:
                lock_blob_refs(s, exclusive=False)  # see adapters_store.registry_blobs
            row = _job_row(s, job_id, lock=True)
            if row.state in TERMINAL_JOB_STATES:
                return job_record(row)
            now = utcnow()
            for name, value in fields.items():
                setattr(row, name, value)
            new_state = fields.get("state")
            if new_state == "running" and row.started_at is None:
                row.started_at = now
            if new_state in TERMINAL_JOB_STATES and "finished_at" not in fields:
                row.finished_at = now
            row.updated_at = now
            if new_state in TERMINAL_JOB_STATES:
                enqueue_terminal_webhook(s, row)
            if event is not None:
                s.add(JobEventRow(job_id=job_id, kind=event[0], data=event_data, created_at=now))
            s.flush()
            return job_record(row)

        return self._db.write(fn)

    def expire_checkpoints(self, failed_before: datetime) -> list[str]:
        """Drop the checkpoint references of ended jobs; return the sha256s dropped.

        Succeeded and cancelled jobs lose theirs at once (the worker already
        does this as the job ends; this catches a worker that died in
        between, and registries from before checkpoints were freed). A failed
        job keeps its last checkpoint until `failed_before` passes its
        finished_at (DIFFFIT_CHECKPOINT_RETENTION_S). The only change ever
        made to a job in a terminal state.
        """

        def fn(s: Session) -> list[str]:
            failed_expired = (Job.state == "failed") & (
                Job.finished_at.is_(None) | (Job.finished_at < failed_before)
            )
            rows = s.scalars(
                select(Job)
                .where(Job.checkpoint_sha256.is_not(None))
                .where(Job.state.in_(["succeeded", "cancelled"]) | failed_expired)
                .with_for_update()
            ).all()
            shas = []
            for row in rows:
                shas.append(row.checkpoint_sha256)
                row.checkpoint_sha256 = None
                row.checkpoint_step = None
            s.flush()
            return list(dict.fromkeys(shas))

        return self._db.write(fn)

    def request_cancel(self, tenant_id: int, job_id: str) -> JobRecord:
        """Ask a job to stop.

        A queued job is cancelled at once; a running one gets the flag that
        its worker checks every step; a finished one is returned unchanged.
        """

        def fn(s: Session) -> JobRecord:
            row = _job_row(s, job_id, tenant_id, lock=True)
            if row.state in TERMINAL_JOB_STATES:
                return job_record(row)
            now = utcnow()
            row.cancel_requested = True
            if row.state == "queued":
                row.state = "cancelled"
                row.finished_at = now
                enqueue_terminal_webhook(s, row)
            row.updated_at = now
            s.flush()
            return job_record(row)

        return self._db.write(fn)

    def add_job_event(self, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
        """Append an event to a job's log; JobNotFound for an unknown job."""
        if not kind:
            raise InvalidRequest("event kind must be a non-empty string")
        payload = _normalise_json(data, f"data of job event {kind!r}")

        def fn(s: Session) -> JobEvent:
            _job_row(s, job_id)
            row = JobEventRow(job_id=job_id, kind=kind, data=payload, created_at=utcnow())
            s.add(row)
            s.flush()
            return _event_record(row)

        return self._db.write(fn)

    def job_events(self, job_id: str, after_id: int = 0) -> list[JobEvent]:
        """Events of a job with id > `after_id`, oldest first ([] for unknown jobs).

        Not tenant-scoped: callers check access with `get_job` first.
        """

        def fn(s: Session) -> list[JobEvent]:
            rows = s.scalars(
                select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
                .order_by(JobEventRow.id)
            )
            return [_event_record(r) for r in rows]

        return self._db.read(fn)

    def preview_blob_shas(self) -> set[str]:
        """The sha256 of every preview grid a job's ``preview`` event names, all tenants:
        blobs a garbage collector must keep while those events exist."""

        def fn(s: Session) -> set[str]:
            rows = s.scalars(select(JobEventRow.data).where(JobEventRow.kind == "preview"))
            return {str(d["sha256"]) for d in rows if isinstance(d, dict) and d.get("sha256")}

        return self._db.read(fn)

    def count_active_jobs(self, tenant_id: int) -> int:
        """The tenant's jobs that are `queued` or `running` (its share of the fine-tune capacity)."""

        def fn(s: Session) -> int:
            active = Job.state.in_(("queued", "running"))
            query = select(func.count()).where(Job.tenant_id == tenant_id, active)
            return int(s.scalar(query) or 0)

        return self._db.read(fn)

    def count_jobs_by_state(self) -> dict[str, int]:
        """Number of jobs in each state, all tenants (every state present, 0 if none)."""

        def fn(s: Session) -> dict[str, int]:
            counts = dict.fromkeys(JOB_STATES, 0)
            for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                counts[state] = int(n)
            return counts

        return self._db.read(fn)
