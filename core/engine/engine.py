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

If anything escapes the loop (a bug, a device error), the engine is dead:
every pending future fails at once with :class:`EngineDead`, later submits
fail immediately, and the death callbacks run (the worker reports itself
down and exits so its supervisor restarts it).

Nothing here knows about HTTP, Celery or the registry.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from core.adapter.model import DiffFitDiT
from core.base_model import BaseModel
from core.engine.bank import SlotBank
from core.engine.sampling import SampleRequest, denoise_step
from difffit.errors import DiffFitError, EngineDead

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
        # Guards the inbox against a submit racing the death sweep (it would hang forever).
        self._life = threading.Lock()
        self._dead: EngineDead | None = None
        self._death_callbacks: list[Callable[[EngineDead], None]] = []
        self._fault: str | None = None  # set by inject_fault (test hook)
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
        return self._thread.is_alive() and self._dead is None

    @property
    def dead(self) -> EngineDead | None:
        """The error pending and later work fails with, once the loop died; else None."""
        return self._dead

    def on_death(self, callback: Callable[[EngineDead], None]) -> None:
        """Run `callback(error)` once if the loop dies (at once if it already has)."""
        with self._life:
            if self._dead is None:
                self._death_callbacks.append(callback)
                return
        callback(self._dead)

    def inject_fault(self, reason: str = "fault injected by the test hook") -> None:
        """Make the loop raise at its next iteration (tests of the supervision only)."""
        self._fault = reason

    def submit(self, request: SampleRequest) -> Future:
        """Queue a sampling request; its future resolves to float CPU images [n, C, H, W]."""
        self._put(("sample", request))
        return request.future

    def submit_training(self, run) -> Future:
        """Queue a training run (see core.engine.training); resolves when it ends."""
        self._put(("train", run))
        return run.future

    def call(self, fn) -> Future:
        """Run `fn()` on the engine thread between steps (device work from other threads)."""
        future: Future = Future()
        self._put(("call", (fn, future)))
        return future

    def wait(self, future: Future, timeout: float | None = None):
        """`future.result(timeout)`, but EngineDead as soon as the engine is gone.

        Death fails every pending future itself; this also covers a thread that
        ended without passing through that sweep.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            try:
                return future.result(timeout=max(left, 0))
            except FutureTimeout:
                if not future.done() and not self.alive and not self._stop.is_set():
                    raise self.death_error() from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def death_error(self) -> EngineDead:
        """A fresh EngineDead to raise: one shared instance raised in many threads mixes their tracebacks."""
        return EngineDead(
            self._dead.message if self._dead is not None else "the engine thread is not running"
        )

    def _put(self, item) -> None:
        with self._life:
            if self._dead is not None:
                raise self.death_error()
            self._inbox.put(item)

    def queue_depth(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    # -- engine thread --------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the engine is gone
            log.critical("the engine thread died", exc_info=True)
            self._die(exc)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if self._fault is not None:
                raise RuntimeError(self._fault)
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

    def _die(self, exc: BaseException) -> None:
        """Fail everything pending with EngineDead, refuse what comes later, tell the owner."""
        error = EngineDead(f"the worker's engine died ({type(exc).__name__}: {exc}); the worker restarts")
        with self._life:
            self._dead = error
            callbacks, self._death_callbacks = self._death_callbacks, []
        futures = [r.future for r in (*self._active, *self._waiting)]
        futures += [run.future for run in self._training]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                kind, obj = item
                futures.append(obj[1] if kind == "call" else obj.future)
        self._active, self._waiting, self._training = [], deque(), deque()
        # The owner hears first (a worker stops taking tasks) so the waiters woken
        # below do not hand their work back to this same process.
        for callback in callbacks:
            try:
                callback(error)
            except Exception:  # noqa: BLE001 - one owner's failure must not skip the others
                log.exception("an engine death callback failed")
        for future in futures:
            with contextlib.suppress(InvalidStateError):  # cancelled by its waiter meanwhile
                future.set_exception(self.death_error())

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
            "engine_alive": self._dead is None,
        }
