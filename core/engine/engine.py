"""The engine: one thread that owns the device and the resident base.

Celery task threads hand it :class:`SampleRequest` and training runs and
wait on futures. Each loop iteration:

1. drop cancelled requests, admit waiting ones at the step boundary (batch-size
   cap, free slot), round-robin across tenants;
2. one denoising step for a group of requests sharing a latent size;
3. decode the requests that finished (one batched VAE call) and resolve them
   with image tensors (the callers encode PNGs on their own threads);
4. one micro-batch of a training run's optimizer step, if any (sampling goes
   first; a step split into micro-batches lets sampling steps run between them).

Nothing here knows about HTTP, Celery or the registry.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

from core.adapter.model import DiffFitDiT
from core.base_model import BaseModel
from core.engine.bank import SlotBank
from core.engine.sampling import SampleRequest, denoise_step
from difffit.errors import DiffFitError

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching sampler and trainer over one resident base."""

    def __init__(
        self,
        base: BaseModel,
        slots: int = 16,
        max_classes: int = 1000,
        max_batch_size: int = 64,
        train_share: float = 0.2,
        table_rows: int | None = None,
    ):
        self.base = base
        self.device = next(base.transformer.parameters()).device
        self.dtype = next(base.transformer.parameters()).dtype
        self.model = DiffFitDiT(base.transformer, slots=slots, max_classes=max_classes, table_rows=table_rows)
        self.bank = SlotBank(self.model)
        self.max_batch_size = max_batch_size
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[SampleRequest] = deque()
        self._admissions = 0  # admission counter; per tenant, the value at its last one
        self._last_admitted: dict[str | None, int] = {}
        self._active: list[SampleRequest] = []
        self._training: deque = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="difffit-engine", daemon=True)
        self.steps_run = 0
        self.last_batch_rows = 0
        # Sampling first: while requests are active, training gets at most this share
        # of engine time (decayed sums of seconds spent on each).
        self.train_share = train_share
        self._sample_s = self._train_s = 0.0

    # -- public, any thread ---------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: SampleRequest) -> Future:
        """Queue a sampling request; its future resolves to float CPU images [n, C, H, W]."""
        self._inbox.put(("sample", request))
        return request.future

    def submit_training(self, run) -> Future:
        """Queue a training run (see core.engine.training); resolves when it ends."""
        self._inbox.put(("train", run))
        return run.future

    def call(self, fn) -> Future:
        """Run `fn()` on the engine thread between steps (device work from other threads)."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def queue_depth(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    # -- engine thread --------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            idle = not (self._active or self._waiting or self._training)
            self._drain_inbox(block=idle)
            self._admit()
            if self._active:
                started = time.perf_counter()
                self._sample_step()
                self._sample_s = 0.99 * self._sample_s + (time.perf_counter() - started)
            if self._training and (not self._active or self._training_may_run()):
                started = time.perf_counter()
                self._train_step()
                self._train_s = 0.99 * self._train_s + (time.perf_counter() - started)
        for r in [*self._active, *self._waiting]:
            r.future.set_exception(DiffFitError("the worker is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, obj = item
            if kind == "sample":
                self._waiting.append(obj)
            elif kind == "call":
                self._run_call(*obj)
            else:
                self._training.append(obj)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    @staticmethod
    def _run_call(fn, future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _admit(self) -> None:
        """Drop cancelled requests, then start waiting ones, round-robin across tenants.

        Each pick goes to the tenant admitted least recently (FIFO within a
        tenant, a request that does not fit yet is passed over), so one
        tenant's backlog cannot hold back another's single request.
        """
        for r in [r for r in self._active if r.future.cancelled()]:
            self._finish(r)  # the caller gave up: its rows and slot go to others now
        rows = sum(r.rows for r in self._active)
        waiting = [r for r in self._waiting if not r.future.cancelled()]
        blocked: set[int] = set()  # no free slot for these in this pass
        while (r := self._next_to_admit(waiting, rows, blocked)) is not None:
            try:
                slot = self.bank.acquire(r.adapter_key, r.adapter_tensors)
            except Exception as exc:  # noqa: BLE001 - the request fails, the engine lives
                waiting.remove(r)
                r.future.set_exception(exc)
                continue
            if slot is None:
                blocked.add(id(r))
                continue
            waiting.remove(r)
            r.slot, r.null_label = slot, self.model.num_classes_of(slot)
            r.adapter_tensors = None  # the bank has them now
            r.start(self.base.scheduler_config, self.base.in_channels, self.device, self.dtype)
            self._active.append(r)
            rows += r.rows
            self._admissions += 1
            self._last_admitted[r.tenant] = self._admissions
        self._waiting = deque(waiting)
        # Only tenants still waiting or running need their turn remembered (one that
        # comes back after both goes first); a tenant whose one request is running
        # keeps its turn, so its next request queues behind another tenant's.
        present = {r.tenant for r in waiting} | {r.tenant for r in self._active}
        self._last_admitted = {t: n for t, n in self._last_admitted.items() if t in present}

    def _next_to_admit(
        self, waiting: list[SampleRequest], rows: int, blocked: set[int]
    ) -> SampleRequest | None:
        """The first request that fits of the tenant whose last admission is oldest."""
        best, best_turn, seen = None, 0, set()
        for r in waiting:
            if r.tenant in seen or id(r) in blocked:
                continue
            # A request bigger than the cap runs alone rather than never.
            if rows + r.rows > self.max_batch_size and (self._active or rows):
                continue
            seen.add(r.tenant)
            turn = self._last_admitted.get(r.tenant, 0)
            if best is None or turn < best_turn:
                best, best_turn = r, turn
        return best

    def _sample_step(self) -> None:
        # Requests that cannot share a forward (another latent size) form groups;
        # the group holding the oldest request goes first.
        oldest = min(self._active, key=lambda r: r.enqueued_at)
        group = [r for r in self._active if r.latent_size == oldest.latent_size]
        try:
            denoise_step(self.model, group, self.base.learned_sigma)
        except Exception as exc:  # noqa: BLE001
            log.exception("denoising step failed")
            for r in group:
                self._finish(r, exc=exc)
            return
        self.steps_run += 1
        self.last_batch_rows = group[0].batch_sizes[-1]
        finished = [r for r in group if r.done]
        for r in [r for r in finished if r.return_latents]:
            self._finish(r, result=r.latents.float().cpu())
        finished = [r for r in finished if not r.return_latents]
        if finished:
            try:
                images = self._decode(torch.cat([r.latents for r in finished]))
            except Exception as exc:  # noqa: BLE001
                for r in finished:
                    self._finish(r, exc=exc)
                return
            offset = 0
            for r in finished:
                self._finish(r, result=images[offset : offset + r.n])
                offset += r.n

    def _finish(self, r: SampleRequest, result=None, exc: BaseException | None = None) -> None:
        self._active.remove(r)
        self.bank.release(r.slot)
        if not r.future.done():
            r.future.set_exception(exc) if exc is not None else r.future.set_result(result)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latents -> [N, C, H, W] float images on the CPU, one batched VAE decode.

        PNG encoding is left to the callers' threads: it never holds up the next step.
        """
        return self.base.decode(latents).float().cpu()

    def _training_may_run(self) -> bool:
        """With sampling waiting, train only while training's time share is under train_share."""
        total = self._sample_s + self._train_s
        return total == 0 or self._train_s / total < self.train_share

    def _train_step(self) -> None:
        run = self._training[0]
        try:
            with torch.enable_grad():
                run.micro_step()
            finished = run.finished
        except Exception as exc:  # noqa: BLE001
            log.exception("training step failed")
            self._training.popleft()
            if not run.future.done():
                run.future.set_exception(exc)
            return
        self._training.rotate(-1)  # round robin between concurrent jobs
        if finished:
            self._training.remove(run)
            if not run.future.done():
                run.future.set_result(run.result())

    def stats(self) -> dict:
        return {
            **self.bank.stats(),
            "queue_depth": self.queue_depth(),
            "active_requests": len(self._active),
            "training_runs": len(self._training),
            "steps_run": self.steps_run,
            "last_batch_rows": self.last_batch_rows,
        }
