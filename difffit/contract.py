"""The contract between the HTTP service and the workers.

Task names, queue names and the pydantic payloads both sides import. No
torch here: the service container must not need it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Celery task names and queues. The service enqueues by name only.
GENERATE_TASK = "difffit.generate"
FINETUNE_TASK = "difffit.finetune"
GENERATE_QUEUE = "generate"
FINETUNE_QUEUE = "finetune"

# Each worker publishes WorkerStats as JSON under WORKER_STATS_KEY.format(hostname)
# every WORKER_STATS_INTERVAL_S seconds with a TTL of 3 intervals; a key that is
# present means a live worker (used by /readyz and /metrics).
WORKER_STATS_KEY = "difffit:worker:{}"
WORKER_STATS_INTERVAL_S = 5.0

# The API sets GENERATE_CANCEL_KEY.format(task_id) (TTL GENERATE_CANCEL_TTL_S) when the
# caller of a generate went away; the worker's task thread polls it and drops the request.
GENERATE_CANCEL_KEY = "difffit:cancel:{}"
GENERATE_CANCEL_TTL_S = 3600

#: Tenant and adapter names: 1-64 lowercase letters, digits, '_' or '-', starting with a
#: letter or digit. The one definition: the registry, the routes and FinetuneRequest use it.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
NAME_MAX_LENGTH = 64

Method = Literal["difffit", "bitfit"]
Objective = Literal["standard", "diff_tuning"]
SchedulerName = Literal["ddim", "dpm++", "ddpm"]
BlockSpan = Literal["none", "first_half", "all"]
ClassTable = Literal["new", "keep"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


class Placement(BaseModel):
    """Where DiffFit puts its scale vectors gamma (biases are always trained).

    The default is the paper's final setting (Table 4c row 8: blocks, Q/K/V and
    the final layer, with gamma only in the first half of the blocks, Table 4b),
    as its reference code places it: gamma on Q/K/V and on the attention and
    MLP branch outputs of blocks 0..L/2-1 only (deep-block gammas hurt, Table
    4a), plus the final layer. The other spans are the ablations.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    qkv: BlockSpan = "first_half"
    branches: BlockSpan = "first_half"
    final_layer: bool = True

    @classmethod
    def bitfit(cls) -> Placement:
        """No gamma anywhere: BitFit."""
        return cls(qkv="none", branches="none", final_layer=False)


class FinetuneRequest(BaseModel):
    """Body of ``POST /finetune``; stored on the job and read by the worker."""

    model_config = ConfigDict(extra="forbid")

    dataset_url: str | None = Field(
        None, min_length=1, max_length=2048, description="zip or tar(.gz) URL (or give `dataset_id`)."
    )
    dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=40,
        pattern=r"^ds_[0-9a-f]{1,37}$",
        description="An uploaded data set (`POST /datasets`) instead of `dataset_url`.",
    )
    adapter: str = Field(
        ...,
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        pattern=NAME_PATTERN,
        description="Adapter name in the tenant's namespace (lowercase, digits, _ and -).",
    )
    method: Method = "difffit"
    objective: Objective = "standard"
    placement: Placement | None = Field(
        None, description="Gamma placement; default the paper's for difffit, none for bitfit."
    )
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="AdamW lr (paper: 1e-3).")
    resolution: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="Image side to train (and later sample) at; default the base's. A larger side "
        "than the base's uses the base's positional-encoding grid interpolated (the paper's 256 -> 512).",
    )
    class_table: ClassTable = Field(
        "new",
        description="new: a fresh class table for the data set's classes; keep: start from the base's "
        "table (class folders must be named after base classes or their indices), as the paper's 512 run.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    ema: bool = Field(False, description="Keep an EMA of the adapter tensors and save it.")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints.")
    preview_every: int | None = Field(
        None,
        ge=1,
        description="Every this many steps, sample a small preview grid with the adapter being "
        "trained and send it as a `preview` event (off when unset).",
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="http(s) URL that gets a signed POST of the job when it ends (any terminal state).",
    )

    @model_validator(mode="after")
    def _one_dataset(self) -> FinetuneRequest:
        if (self.dataset_url is None) == (self.dataset_id is None):
            raise ValueError("give exactly one of dataset_url and dataset_id")
        return self

    def resolved_placement(self) -> Placement:
        """The placement actually used for this method."""
        if self.method == "bitfit":
            return Placement.bitfit()
        return self.placement or Placement()


class AdapterRef(BaseModel):
    """What a worker needs to find an adapter version: its blob hash."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    tenant_id: int | None = Field(
        None, description="Owner; when set the worker re-checks the version still exists."
    )


class GenerateTask(BaseModel):
    """Payload of the generate task: one request of n images."""

    request_id: str
    tenant: str | None = Field(None, description="Who asked: the engine admits round-robin by tenant.")
    adapter: AdapterRef | None = Field(None, description="None samples from the base model.")
    class_labels: list[int] = Field(..., min_length=1, description="One class index per image.")
    seed: int = 0
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(4.0, ge=1.0, le=50.0)
    scheduler: SchedulerName = "ddim"
    resolution: int | None = None


class GenerateResult(BaseModel):
    """Result of the generate task."""

    images_png_b64: list[str]
    seconds: float
    batch_sizes: list[int] = Field(default_factory=list, description="Engine batch sizes seen.")


class FinetuneTask(BaseModel):
    """Payload of the finetune task: the worker reads the rest from the registry."""

    job_id: str


class AdapterSpec(BaseModel):
    """The tensors an adapter of the resident base may have, published by the workers.

    ``layers`` maps each adapted layer to its width: the layer's ``.bias``
    [width] is required, its ``.gamma`` [width] allowed only for the layers in
    ``gamma_layers``; ``class_table`` is [num_classes + 1, hidden_size].
    """

    layers: dict[str, int] = Field(default_factory=dict)
    gamma_layers: list[str] = Field(default_factory=list)
    hidden_size: int = 0
    max_classes: int = 0
    resolution: int = 0
    resolution_unit: int = 1


class WorkerStats(BaseModel):
    """A worker's engine statistics, as published to Redis."""

    hostname: str
    queues: list[str] = Field(default_factory=list)
    slots: int = 0
    resident: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    queue_depth: int = 0
    active_requests: int = 0
    training_runs: int = 0
    steps_run: int = 0
    last_batch_rows: int = 0
    base_model: str = ""
    base_hash: str = ""
    class_names: list[str] = Field(default_factory=list, description="The base model's classes.")
    adapter_spec: AdapterSpec | None = Field(
        None, description="What an adapter file for this base must hold (checked by imports)."
    )
    resolution: int = Field(0, description="The base model's image side in pixels (0: unknown).")
    engine_alive: bool = Field(
        True, description="False once the worker's engine thread died (the worker is exiting)."
    )
