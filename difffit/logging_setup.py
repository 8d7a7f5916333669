"""Structured logging for the API and the worker: one JSON object per line.

Every line carries ``ts``, ``level``, ``logger`` and ``msg``, plus the ids of
the work it belongs to (``request_id``, ``job_id``, ``task_id``) when they
are known, and ``exc`` with the traceback of a logged exception. The ids
live in one :mod:`contextvars` variable, so code deep in a request (the
registry, the queue client, a thread of the threadpool) needs no logger
argument to have its lines tagged:

- the API's middleware opens a :func:`log_context` per request with its
  ``request_id``;
- routes add ids as they learn them with :func:`bind_log_context` (job
  routes bind ``job_id``, ``POST /generate`` binds ``task_id``);
- the worker can open a :func:`log_context` per task with its ``job_id``.

``bind_log_context`` updates the context's dict in place, so an id bound in
a threadpool thread (which runs in a copy of the request's context) is seen
by the middleware's access line too.

Call :func:`configure_logging` once per process (``service.main.app_factory``
does for the API); it replaces only the handler it installed itself.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

#: The ids of the work the current code runs for (request_id, job_id, task_id...).
_LOG_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "difffit_log_context", default=None
)

#: Context keys written to every line, in this order, when present.
CONTEXT_FIELDS = ("request_id", "job_id", "task_id")

# LogRecord attributes that are not `extra=` fields (so they are not copied into the JSON).
# uvicorn adds `color_message` (its message with ANSI colours) to its records.
_RECORD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}

_HANDLER_NAME = "difffit-structured"


@contextmanager
def log_context(**fields: str) -> Iterator[dict[str, str]]:
    """Run a block with a fresh set of ids (e.g. ``log_context(request_id=rid)``)."""
    ctx = {k: str(v) for k, v in fields.items() if v is not None}
    token = _LOG_CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _LOG_CONTEXT.reset(token)


def bind_log_context(**fields: str | None) -> None:
    """Add ids to the current context (in place, so the whole request sees them)."""
    ctx = _LOG_CONTEXT.get()
    values = {k: str(v) for k, v in fields.items() if v is not None}
    if ctx is None:
        _LOG_CONTEXT.set(values)
    else:
        ctx.update(values)


def current_log_context() -> dict[str, str]:
    """A copy of the current ids."""
    return dict(_LOG_CONTEXT.get() or {})


def current_request_id() -> str | None:
    """The id of the HTTP request being served, if any."""
    return (_LOG_CONTEXT.get() or {}).get("request_id")


class ContextFilter(logging.Filter):
    """Copies the current ids onto each record (``record.request_id`` etc., "-" when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _LOG_CONTEXT.get() or {}
        for key in CONTEXT_FIELDS:
            if not hasattr(record, key):
                setattr(record, key, ctx.get(key, "-"))
        for key, value in ctx.items():
            if key not in CONTEXT_FIELDS and not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the ids, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = _LOG_CONTEXT.get() or {}
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None) or ctx.get(key)
            if value and value != "-":
                out[key] = value
        # `extra=` fields (e.g. the access line's method, path, status, duration_ms).
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out and not key.startswith("_") and value != "-":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra must never make a log line (or the request) fail.
        return json.dumps(out, default=str, ensure_ascii=False)


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s job=%(job_id)s] %(message)s"


def configure_logging(level: str = "INFO", json_logs: bool = True) -> logging.Handler:
    """Send every log line of the process to stderr, as JSON (or plain text with the ids).

    Idempotent: calling it again replaces the handler it installed before.
    uvicorn's own loggers are routed to the same handler; its access log is
    turned off because the API's middleware writes one with the request id.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("difffit").setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.setLevel(logging.WARNING)
    return handler
