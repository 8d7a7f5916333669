"""The one `Settings` of DiffFit Serve, read once from the environment.

Every knob is an environment variable with the prefix ``DIFFFIT_`` (for
example ``DIFFFIT_REDIS_URL``); the README lists them all. The service and
the worker read the same class, so a deployment configures both with one
env file.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_BASE_MODEL = REPO_ROOT / "base_models" / "fmnist-dit"


class Settings(BaseSettings):
    """All configuration of the API, the worker and the embedded runner."""

    model_config = SettingsConfigDict(env_prefix="DIFFFIT_", extra="ignore", frozen=True)

    # --- storage -----------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Root of local state (SQLite file, blobs).")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the registry; default sqlite in data_dir."
    )
    blob_dir: Path | None = Field(None, description="Blob store folder; default data_dir/blobs.")
    blob_url: str | None = Field(
        None, description="Blob store: file:///path or s3://bucket/prefix; default file:// of blob_dir."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for non-AWS services (MinIO, Ceph, R2); unset = AWS."
    )
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint named in presigned download URLs; default s3_endpoint_url."
    )
    download_redirect: bool = Field(
        False, description="File downloads answer 307 to a presigned URL (S3 stores) instead of streaming."
    )
    download_url_ttl_s: int = Field(300, ge=1, le=7 * 86400, description="Lifetime of a presigned URL.")
    checkpoint_retention_s: int = Field(
        7 * 86400, ge=0, description="How long a failed job keeps its last checkpoint (difffit gc)."
    )
    gc_grace_s: int = Field(
        86400, ge=0, description="difffit gc spares unreferenced blobs younger than this (uploads in flight)."
    )

    # --- broker ------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and result backend.")
    visibility_timeout_s: int = Field(
        4 * 3600, description="Redis redelivery timeout for unacked tasks; above the longest job."
    )
    max_task_retries: int = Field(
        3, description="How many times a job whose worker died is redelivered before it fails."
    )

    # --- model / engine ----------------------------------------------------
    base_model: str = Field(
        str(BUNDLED_BASE_MODEL),
        description="diffusers folder or hub id of the base DiT (e.g. facebook/DiT-XL-2-256).",
    )
    device: str = Field("auto", description="torch device for the engine: auto, cpu, cuda, cuda:1.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Inference dtype of the resident base."
    )
    adapter_slots: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        16, description="Device adapter slots (slot 0 = base), or auto: as many as the memory budget holds."
    )
    adapter_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1.0,
        description="With slots auto on CUDA: share of the device memory free after the base and the "
        "activation reserve that the adapter slots take.",
    )
    activation_reserve_mb: int = Field(
        16384, ge=0, description="With slots auto on CUDA: device memory (MiB) kept free for activations."
    )
    adapter_cpu_budget_mb: int = Field(
        64, ge=1, description="With slots auto on a CPU device: memory (MiB) of the adapter slots."
    )
    adapter_budget_classes: int = Field(
        100, ge=1, description="Classes per adapter assumed when sizing the shared class-row store."
    )
    host_tier_mb: int = Field(
        2048, ge=0, description="Host memory (MiB) of parsed adapters kept beyond the device slots (LRU)."
    )
    max_batch_size: int = Field(64, ge=1, description="Most samples in one engine forward.")
    max_classes: int = Field(
        1000, ge=1, description="Most classes an adapter may have (rows of its class table - 1)."
    )
    train_microbatch: int = Field(
        0,
        ge=0,
        description="Rows per training micro-batch: a step's batch is split, gradients accumulated, "
        "sampling steps run in between; 0 = the whole batch at once.",
    )
    train_share: float = Field(
        0.2, gt=0, le=1.0, description="Most share of engine time fine-tuning gets while requests sample."
    )
    engine_threads: int = Field(
        8, ge=1, description="Celery task threads per worker that hand work to the engine thread."
    )
    max_concurrent_finetunes: int = Field(
        2,
        ge=1,
        description="Fine-tunes one worker runs at once (at most engine_threads - 1, so generate tasks "
        "always find a thread); a worker at the cap requeues further fine-tune tasks.",
    )

    # --- requests ----------------------------------------------------------
    generate_timeout_s: float = Field(300.0, description="How long POST /generate waits for images.")
    max_images_per_request: int = Field(16, ge=1, description="Upper bound of `n` on /generate.")
    max_sampling_steps: int = Field(1000, ge=1, description="Upper bound of `steps` on /generate.")
    max_finetune_steps: int = Field(100_000, ge=1, description="Upper bound of `steps` on /finetune.")
    checkpoint_every: int = Field(50, ge=1, description="Fine-tune checkpoint interval in steps.")
    max_queued_generate: int = Field(
        256, ge=1, description="Most generate tasks waiting in Redis; at this depth /generate answers 429."
    )
    max_queued_finetune: int = Field(
        64, ge=1, description="Most fine-tune jobs waiting in Redis; at this depth /finetune answers 429."
    )
    max_waiting_generate: int = Field(
        256, ge=1, description="Most POST /generate requests waiting at once per API process; then 429."
    )
    tenant_max_queued_generates: int = Field(
        32, ge=1, description="Most generate requests one tenant has queued or running at once; then 429."
    )
    tenant_max_queued_finetunes: int = Field(
        8, ge=1, description="Most fine-tune jobs one tenant has queued or running at once; then 429."
    )

    # --- datasets ----------------------------------------------------------
    allow_file_urls: bool = Field(False, description="Accept file:// dataset URLs (local runs, tests).")
    allow_private_urls: bool = Field(
        False, description="Accept http(s) dataset URLs on loopback/private addresses."
    )
    dataset_max_bytes: int = Field(512 * 1024**2, description="Largest dataset download in bytes.")
    dataset_max_files: int = Field(100_000, description="Most files in a dataset archive.")
    dataset_max_unpacked_bytes: int = Field(
        2 * 1024**3, description="Largest total uncompressed size of a dataset archive."
    )
    dataset_timeout_s: float = Field(300.0, description="Dataset download time limit.")
    intake_chunk: int = Field(
        256,
        ge=1,
        description="Images a fine-tune's intake decodes and encodes at a time (one engine call per "
        "chunk): intake's host memory grows with this, not with the data set.",
    )
    intake_memmap_mb: int = Field(
        256,
        ge=0,
        description="A training set whose latents exceed this many MiB is kept in a memory-mapped file "
        "under data_dir/intake (deleted when the job ends) instead of host RAM; 0 = always a file.",
    )
    adapter_max_bytes: int = Field(
        256 * 1024**2, description="Largest adapter file accepted by POST /adapters/{name}/versions."
    )

    # --- webhooks ------------------------------------------------------------
    webhook_dispatch: bool = Field(
        True, description="Run the webhook dispatcher (a thread) in this API process."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Time limit of one webhook call.")
    webhook_max_attempts: int = Field(8, ge=1, description="Webhook calls per delivery before it fails.")
    webhook_backoff_s: float = Field(
        5.0, gt=0, description="Delay before the first webhook retry; doubles each attempt (at most 1 h)."
    )
    webhook_poll_s: float = Field(1.0, gt=0, description="How often the dispatcher looks for due webhooks.")

    # --- API ---------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Bind address of `difffit serve`'s API.")
    api_port: int = Field(8000, description="Port of `difffit serve`'s API.")
    admin_key: str | None = Field(None, description="Key for the admin endpoints; unset disables them.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_json: bool = Field(True, description="One JSON object per log line (request and job ids).")
    test_hooks: bool = Field(
        False,
        description="TEST HOOK, never in production: SIGUSR1 to a worker kills its engine thread "
        "(the supervision tests use it); off, the signal keeps Celery's meaning.",
    )

    # --- tests -----------------------------------------------------------------
    test_faults: str = Field(
        "",
        description="Test hook, never set in production: faults a worker injects on purpose "
        "(oom-at-step:N = a MemoryError at every job's optimizer step N). Empty = none.",
    )

    @property
    def resolved_database_url(self) -> str:
        """The registry URL, defaulting to SQLite under `data_dir`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @property
    def resolved_blob_dir(self) -> Path:
        """The blob folder, defaulting to `data_dir/blobs`."""
        return (self.blob_dir or self.data_dir / "blobs").resolve()

    @property
    def resolved_blob_url(self) -> str:
        """The blob store URL, defaulting to the folder `resolved_blob_dir`."""
        return self.blob_url or self.resolved_blob_dir.as_uri()

    @field_validator("blob_url", "s3_endpoint_url", "s3_public_endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `VAR=` through as an empty string: it means "not set"
        # (e.g. an empty DIFFFIT_S3_ENDPOINT_URL selects AWS itself).
        return None if value == "" else value

    @field_validator("blob_url")
    @classmethod
    def _blob_url_scheme(cls, value: str | None) -> str | None:
        # Checked here so a typo stops the process at start, naming the variable.
        if value is not None and not value.startswith(("file:///", "s3://")):
            raise ValueError(f"DIFFFIT_BLOB_URL={value!r}: use file:///absolute/path or s3://bucket/prefix")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
