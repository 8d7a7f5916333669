"""Resource faults are job faults, and the test hook that injects one.

:func:`job_fault` turns a host ``MemoryError`` or a CUDA out-of-memory
error raised by one stage of a job into :class:`OutOfMemory`, which fails
that job with code ``out-of-memory`` and says what to lower; the worker,
its resident base and every other request live on.

``DIFFFIT_TEST_FAULTS`` is a test hook (never set in production; empty, as
by default, :func:`inject_faults` does nothing): ``oom-at-step:N`` raises a
MemoryError in the micro-step that would complete optimizer step N,
``oom-when-exists:PATH`` in the first micro-step after PATH exists (so a
test decides when).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from difffit.errors import OutOfMemory

TRAINING_ADVICE = (
    "lower train_microbatch (DIFFFIT_TRAIN_MICROBATCH, rows per forward), the job's batch_size "
    "or its resolution"
)


@contextlib.contextmanager
def job_fault(stage: str, advice: str) -> Iterator[None]:
    """Out-of-memory inside the block fails the job (OutOfMemory), naming `stage` and `advice`."""
    try:
        yield
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        where = "device" if isinstance(exc, torch.cuda.OutOfMemoryError) else "host"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OutOfMemory(f"out of {where} memory while {stage} ({detail}); {advice}") from exc


def inject_faults(run, spec: str) -> None:
    """Arm the faults of `spec` (DIFFFIT_TEST_FAULTS) on a training run; no-op when empty."""
    if not spec:
        return
    kind, _, arg = spec.partition(":")
    if kind == "oom-at-step":
        step = int(arg)

        def due() -> bool:
            return run.progress.step + 1 >= step
    elif kind == "oom-when-exists":

        def due() -> bool:
            return Path(arg).exists()
    else:
        raise ValueError(f"DIFFFIT_TEST_FAULTS: unknown fault {spec!r}")
    micro_step = run.micro_step

    def faulty() -> bool:
        if due():
            raise MemoryError(f"injected by DIFFFIT_TEST_FAULTS={spec}")
        return micro_step()

    run.micro_step = faulty
