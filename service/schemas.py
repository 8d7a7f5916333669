"""Response models of the API (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difffit.contract import NAME_MAX_LENGTH, NAME_PATTERN, JobState


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


# --- jobs ---------------------------------------------------------------------
class JobProgress(_Out):
    step: int = Field(0, description="Optimizer steps done.")
    total: int = Field(0, description="Optimizer steps requested.")
    loss: float | None = Field(None, description="Latest training loss.")
    eta_s: float | None = Field(None, description="Estimated seconds left.")


class JobError(_Out):
    code: str = Field(..., description="Stable error code (the problem type's last part).")
    message: str


class Job(_Out):
    """A fine-tuning job."""

    id: str
    adapter: str = Field(..., description="Adapter name the job trains.")
    state: JobState
    progress: JobProgress
    error: JobError | None = None
    adapter_version: int | None = Field(None, description="Version registered when it succeeded.")
    cancel_requested: bool = False
    attempts: int = 0
    request: dict[str, Any] = Field(default_factory=dict, description="The accepted request body.")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobList(_Out):
    jobs: list[Job]


# --- adapters -----------------------------------------------------------------
class AdapterVersion(_Out):
    version: int
    sha256: str
    size_bytes: int | None = None
    method: str | None = None
    class_names: list[str] = Field(default_factory=list)
    num_classes: int = 0
    resolution: int | None = None
    trainable_params: int | None = None
    base_model_hash: str | None = None
    job_id: str | None = None
    created_at: datetime | None = None
    files: dict[str, str] = Field(default_factory=dict, description="Role -> blob sha256.")
    file_urls: dict[str, str] = Field(
        default_factory=dict, description="Role -> URL of the file (sample grid, loss curve)."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)


class Adapter(_Out):
    name: str
    latest_version: int | None = None
    created_at: datetime | None = None
    versions: list[AdapterVersion] = Field(default_factory=list)


class AdapterSummary(_Out):
    name: str
    latest_version: int | None = None
    created_at: datetime | None = None
    num_versions: int = 0
    class_names: list[str] = Field(default_factory=list, description="Of the latest version.")


class AdapterList(_Out):
    adapters: list[AdapterSummary]


# --- datasets -----------------------------------------------------------------
class Dataset(_Out):
    """An uploaded data set, validated (pass its `id` as `dataset_id` to `POST /finetune`)."""

    id: str
    sha256: str = Field(..., description="sha256 of the archive as uploaded.")
    filename: str | None = Field(None, description="The uploaded file's name, if the client sent one.")
    size_bytes: int
    classes: list[str] = Field(..., description="Class names: the folder names, sorted.")
    class_counts: list[int] = Field(..., description="Images per class, in the order of `classes`.")
    images: int
    created_at: datetime | None = None


class DatasetList(_Out):
    datasets: list[Dataset]


# --- generate -----------------------------------------------------------------
class GenerateResponse(_Out):
    """JSON answer of ``POST /generate`` (when JSON is asked for or n > 1)."""

    request_id: str
    images: list[str] = Field(..., description="Base64-encoded PNG images.")
    adapter: str | None = Field(None, description="Adapter name; null for the base model.")
    version: int | None = None
    class_: int = Field(..., alias="class", serialization_alias="class", description="Class index.")
    class_name: str | None = None
    n: int
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    resolution: int | None = Field(
        None, description="Image side in pixels (null: the base's, while no worker is alive to tell it)."
    )
    seconds: float = Field(..., description="Worker-side time for the request.")


class GenerateStatus(_Out):
    """Answer of ``GET /generate/{request_id}``."""

    request_id: str
    state: Literal["pending", "succeeded"]
    images: list[str] = Field(default_factory=list, description="Base64 PNGs once succeeded.")
    seconds: float | None = None


# --- webhooks -----------------------------------------------------------------
class WebhookSecret(_Out):
    """The tenant's webhook signing secret and how it signs."""

    secret: str
    header: str = Field("X-DiffFit-Signature", description="The header that carries the signature.")
    scheme: str = Field(
        "sha256=<hex HMAC-SHA256 of the raw request body under the secret>",
        description="What the header's value is.",
    )


# --- health -------------------------------------------------------------------
class Health(_Out):
    status: Literal["ok"] = "ok"


class Readiness(_Out):
    status: Literal["ready"] = "ready"
    checks: dict[str, str] = Field(default_factory=dict)
    workers_down: list[str] = Field(
        default_factory=list, description="Workers whose engine died (exiting, to be restarted)."
    )


# --- admin --------------------------------------------------------------------
# Tenant and adapter names: difffit.contract.NAME_PATTERN (also the path-parameter pattern).


class TenantCreate(BaseModel):
    """Body of ``POST /admin/tenants``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ...,
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        pattern=NAME_PATTERN,
        description="Tenant name: 1-64 lowercase letters, digits, `_` or `-`.",
    )


class TenantOut(_Out):
    name: str
    disabled: bool = False
    created_at: datetime | None = None


class TenantCreated(_Out):
    """A new tenant and its first API key (shown once: only its hash is stored)."""

    name: str
    api_key: str
    key_prefix: str = Field(..., description="What `DELETE /admin/keys/{prefix}` takes to revoke it.")
    webhook_secret: str | None = Field(
        None, description="Signs the tenant's webhooks (also at `GET /webhooks/secret`)."
    )


class KeyCreated(_Out):
    """A new API key (shown once: only its hash is stored)."""

    tenant: str
    api_key: str
    key_prefix: str = Field(..., description="What `DELETE /admin/keys/{prefix}` takes to revoke it.")
