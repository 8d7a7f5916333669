"""Typed domain errors shared by the service, the worker and the store.

Each error has a stable ``code`` (the last part of the problem+json `type`
URI the API returns) and a message a user can act on. The mapping to HTTP
status codes lives in one place: ``service/errors.py``. Errors cross the
Celery boundary as ``{"code": ..., "message": ...}`` and are rebuilt with
:func:`error_from_code`.
"""

from __future__ import annotations


class DiffFitError(Exception):
    """Base of all domain errors."""

    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """JSON-safe form, for task results and job records."""
        return {"code": self.code, "message": self.message}


class NotFound(DiffFitError):
    code = "not-found"


class AdapterNotFound(NotFound):
    code = "adapter-not-found"


class JobNotFound(NotFound):
    code = "job-not-found"


class TenantNotFound(NotFound):
    code = "tenant-not-found"


class DatasetNotFound(NotFound):
    code = "dataset-not-found"


class Unauthorized(DiffFitError):
    code = "unauthorized"


class Forbidden(DiffFitError):
    code = "forbidden"


class InvalidRequest(DiffFitError):
    code = "invalid-request"


class InvalidDataset(DiffFitError):
    code = "invalid-dataset"


class IncompatibleAdapter(DiffFitError):
    """An adapter built for another base model (hash or shapes differ)."""

    code = "incompatible-adapter"


class CorruptBlob(DiffFitError):
    """A stored file whose content no longer matches its sha256."""

    code = "corrupt-blob"


class Conflict(DiffFitError):
    code = "conflict"


class PayloadTooLarge(DiffFitError):
    """An upload above the server's size limit (the body is not read past it)."""

    code = "payload-too-large"


class Overloaded(DiffFitError):
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(DiffFitError):
    """Redis, the database or every worker is unreachable."""

    code = "backend-unavailable"


class EngineDead(BackendUnavailable):
    """The worker's engine thread died: its pending work fails, the worker restarts."""

    code = "engine-dead"


class GenerationTimeout(DiffFitError):
    code = "generation-timeout"

    def __init__(self, message: str, task_id: str | None = None):
        super().__init__(message)
        self.task_id = task_id


class GenerationCancelled(GenerationTimeout):
    """The caller went away (or gave up): the request left the engine's batch unfinished."""

    code = "generation-cancelled"


class JobCancelled(DiffFitError):
    code = "job-cancelled"


class TrainingFailed(DiffFitError):
    code = "training-failed"


class OutOfMemory(DiffFitError):
    """A job ran out of host or device memory: that job fails, the worker lives on."""

    code = "out-of-memory"


class NonFiniteLoss(TrainingFailed):
    """The training loss became NaN or infinite: the job fails (usually: lower learning_rate)."""

    code = "non-finite-loss"


class UnsupportedPrecision(DiffFitError):
    """Fine-tuning refused on a base dtype it cannot train in (float16: no loss scaling)."""

    code = "unsupported-precision"


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[DiffFitError]] = {
    c.code: c for c in [DiffFitError, *_all_subclasses(DiffFitError)]
}


def error_from_code(code: str, message: str) -> DiffFitError:
    """Rebuild a domain error sent across a process boundary."""
    cls = ERRORS_BY_CODE.get(code, DiffFitError)
    return cls(message)
