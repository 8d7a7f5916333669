"""Frozen records the registry returns instead of ORM objects.

Records are plain pydantic values: they can be logged, serialised and
passed between threads, and reading one never touches the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from difffit.contract import TERMINAL_JOB_STATES, JobState


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class TenantRecord(_Record):
    """A tenant: the namespace that owns adapters, jobs and API keys."""

    id: int
    name: str
    created_at: datetime
    disabled: bool = False


class VersionRecord(_Record):
    """One immutable version of an adapter, pointing at its blob by sha256."""

    name: str
    version: int
    sha256: str
    size_bytes: int
    method: str
    base_model_hash: str
    class_names: list[str]
    resolution: int
    trainable_params: int
    metadata: dict[str, Any]
    files: dict[str, str]
    job_id: str | None
    created_at: datetime

    @property
    def num_classes(self) -> int:
        """How many classes the adapter's class table covers."""
        return len(self.class_names)


class AdapterRecord(_Record):
    """An adapter name in a tenant's namespace with all of its versions."""

    name: str
    created_at: datetime
    latest_version: int
    versions: list[VersionRecord]

    @property
    def latest(self) -> VersionRecord:
        """The newest version (what generation uses unless one is named)."""
        return self.versions[-1]


class JobRecord(_Record):
    """A fine-tuning job with its progress and outcome."""

    id: str
    tenant_id: int
    adapter_name: str
    request: dict[str, Any]
    idempotency_key: str | None
    state: JobState
    step: int
    total_steps: int
    loss: float | None
    eta_s: float | None
    error_code: str | None
    error_message: str | None
    adapter_version: int | None
    attempts: int
    cancel_requested: bool
    checkpoint_sha256: str | None
    checkpoint_step: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def terminal(self) -> bool:
        """True once the job can no longer change state."""
        return self.state in TERMINAL_JOB_STATES


class JobEvent(_Record):
    """One entry of a job's event log (progress, state changes, messages)."""

    id: int
    job_id: str
    created_at: datetime
    kind: str
    data: dict[str, Any]


class DatasetRecord(_Record):
    """An uploaded data set: its archive blob and what validation found in it."""

    id: str
    tenant_id: int
    filename: str | None
    sha256: str
    size_bytes: int
    class_names: list[str]
    class_counts: list[int]
    images: int
    created_at: datetime


class WebhookDeliveryRecord(_Record):
    """One webhook call of the outbox (a job's terminal state, to one URL)."""

    id: int
    job_id: str
    tenant_id: int
    url: str
    event: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
