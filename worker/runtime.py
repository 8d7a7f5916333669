"""The worker process's runtime: engine, registry, blobs, and the two task bodies.

Celery task threads call :meth:`Runtime.generate` and :meth:`Runtime.finetune`;
those do the host-side work (blob reads, dataset intake, registry writes)
and hand device work to the one engine thread.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from adapters_store import Registry, blob_store_from_settings
from core.adapter.file import load_adapter
from core.adapter.store import PackedAdapter
from core.base_model import BaseModel, load_base, resolve_device
from core.engine.capacity import Capacity, device_budget, plan_capacity, vector_width
from core.engine.engine import Engine
from core.engine.host_tier import HostTier
from core.engine.images import to_pngs
from core.engine.sampling import SampleRequest
from difffit.contract import GenerateResult, GenerateTask
from difffit.errors import AdapterNotFound, GenerationCancelled, GenerationTimeout, InvalidRequest
from difffit.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sampling_resolution(requested: int | None, trained_at: int, who: str) -> int:
    """The side to sample at: an adapter version's trained resolution (the base's own for the base).

    Another side is refused: the model was fitted at that one (a 512 fine-tune
    learned the interpolated position grid; the base never saw 512).
    """
    if requested is None or requested == trained_at:
        return trained_at
    raise InvalidRequest(
        f"resolution: {who} samples at {trained_at} px, the resolution it was trained at; "
        f"got {requested}. Allowed values: {trained_at}."
    )


class Runtime:
    """Everything one worker process holds: built once, shared by task threads."""

    #: Cancels the futures of generates whose caller went away (worker.cancellation); None: none.
    cancel_watcher = None

    def __init__(self, settings: Settings, base: BaseModel | None = None):
        self.settings = settings
        self.registry = Registry.from_settings(settings)
        self.registry.create_schema()
        self.blobs = blob_store_from_settings(settings)  # a folder or an S3 bucket
        if base is None:
            device = resolve_device(settings.device)
            base = load_base(settings.base_model, device=device, dtype=DTYPES[settings.dtype])
        self.base = base
        self.capacity = self._plan_capacity()
        self.engine = Engine(
            base,
            slots=self.capacity.slots,
            max_classes=settings.max_classes,
            max_batch_size=settings.max_batch_size,
            train_share=settings.train_share,
            table_rows=self.capacity.table_rows,
        ).start()
        on_cuda = self.engine.device.type == "cuda"
        self.host_tier = HostTier(settings.host_tier_mb * 1024**2, pin=on_cuda)
        log.info(
            "engine up: base %s (hash %s...), %d adapter slots, %d class rows",
            base.model_id,
            base.content_hash[:12],
            self.capacity.slots,
            self.capacity.table_rows,
        )

    def _plan_capacity(self) -> Capacity:
        """Device slots and class rows: the configured number, or sized by memory (auto)."""
        s, transformer = self.settings, self.base.transformer
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
        budget = None
        if s.adapter_slots == "auto":
            budget = device_budget(
                table.device, s.adapter_memory_fraction, s.activation_reserve_mb, s.adapter_cpu_budget_mb
            )
        return plan_capacity(
            s.adapter_slots,
            width=vector_width(transformer),
            dim=table.shape[1],
            base_rows=table.shape[0],
            max_classes=s.max_classes,
            budget_classes=s.adapter_budget_classes,
            budget_bytes=budget,
        )

    # -- adapters on the host --------------------------------------------------
    def adapter(self, sha256: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Parsed adapter (tensors, metadata) by content hash, read and verified from the store."""
        return self.blobs.get_parsed(sha256, self._parse_adapter)  # CorruptBlob on a hash mismatch

    def _parse_adapter(self, data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
        return load_adapter(data, base_hash=self.base.content_hash)

    def packed_adapter(self, sha256: str) -> tuple[PackedAdapter, dict]:
        """The adapter laid out for the device bank, from the host tier (filled on a miss).

        Runs on the task thread: reading, hashing, parsing and packing never hold
        up the engine thread, which only copies the packed rows into a slot.
        """

        def parse_and_pack(data: bytes) -> tuple[PackedAdapter, dict]:
            tensors, meta = self._parse_adapter(data)
            return self.engine.model.pack(tensors), meta

        def load() -> tuple[PackedAdapter, dict]:
            # The store re-hashes the bytes beside the parse and pack (CorruptBlob on a mismatch).
            return self.blobs.get_parsed(sha256, parse_and_pack)

        return self.host_tier.get_or_load(sha256, load)

    def _check_still_registered(self, ref) -> None:
        """An adapter deleted after the API resolved it is not served, even from a warm slot."""
        if ref.tenant_id is None:
            return
        version = self.registry.get_version(ref.tenant_id, ref.name, ref.version)
        if version.sha256 != ref.sha256:
            raise AdapterNotFound(f"adapter {ref.name!r} version {ref.version} was replaced")

    def latent_size(self, resolution: int | None) -> int:
        """Pixel resolution -> latent side; InvalidRequest when the model can't take it."""
        if resolution is None:
            return self.base.transformer.config.sample_size
        unit = self.base.vae_scale * self.base.transformer.config.patch_size
        if resolution % unit or resolution <= 0:
            raise InvalidRequest(f"resolution must be a positive multiple of {unit}; got {resolution}")
        return resolution // self.base.vae_scale

    # -- generate --------------------------------------------------------------
    def generate(self, task: GenerateTask) -> GenerateResult:
        """Sample the task's images in the shared batch; PNGs as base64.

        On this worker's timeout, or when `cancel_watcher` sees the caller went
        away, the request's future is cancelled and it leaves the engine's
        batch at the next step. The PNGs are encoded here, on the task thread.
        """
        started = time.perf_counter()
        tensors, key = None, None
        if task.adapter is not None:
            key = task.adapter.sha256
            self._check_still_registered(task.adapter)
            tensors, meta = self.packed_adapter(key)
            num_classes, who = meta["num_classes"], f"adapter {task.adapter.name!r}"
            trained_at = int(meta.get("resolution") or self.base.resolution)
        else:
            num_classes, who = len(self.base.class_names), "the base model"
            trained_at = self.base.resolution
        bad = [c for c in task.class_labels if not 0 <= c < num_classes]
        if bad:
            raise InvalidRequest(f"class {bad[0]} is out of range: {who} has classes 0..{num_classes - 1}")
        request = SampleRequest(
            request_id=task.request_id,
            adapter_key=key,
            adapter_tensors=tensors,
            labels=list(task.class_labels),
            seed=task.seed,
            steps=task.steps,
            guidance_scale=task.guidance_scale,
            scheduler_name=task.scheduler,
            latent_size=self.latent_size(sampling_resolution(task.resolution, trained_at, who)),
            tenant=task.tenant,
        )
        future = self.engine.submit(request)
        watched = self.cancel_watcher.watch(task.request_id, future) if self.cancel_watcher else None
        with watched or contextlib.nullcontext():
            images = self._wait_images(task, future)
        return GenerateResult(
            images_png_b64=[base64.b64encode(p).decode() for p in to_pngs(images)],
            seconds=time.perf_counter() - started,
            batch_sizes=request.batch_sizes,
        )

    def _wait_images(self, task: GenerateTask, future: Future):
        timeout = self.settings.generate_timeout_s
        try:
            return self.engine.wait(future, timeout=timeout)  # EngineDead if the engine goes
        except CancelledError:
            message = "the caller went away; sampling stopped"
            raise GenerationCancelled(message, task_id=task.request_id) from None
        except FutureTimeout as exc:
            future.cancel()  # the engine drops it at the next step
            raise GenerationTimeout(f"no images after {timeout}s", task_id=task.request_id) from exc

    # -- finetune --------------------------------------------------------------
    def finetune(self, job_id: str) -> None:
        """Run a fine-tuning job to a terminal state (see worker.finetune_job)."""
        from worker.finetune_job import run_finetune_job

        run_finetune_job(self, job_id)

    def call(self, fn):
        """Run `fn()` on the engine thread (it owns the device) and return its result.

        EngineDead (at once) when the engine is or goes down: never a wait forever.
        """
        return self.engine.wait(self.engine.call(fn))
