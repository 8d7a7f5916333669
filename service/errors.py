"""The one place where domain errors become HTTP responses.

Every error the API returns is ``application/problem+json`` (RFC 9457) with
``type`` = ``https://difffit.dev/problems/<code>`` (``code`` is the stable
:attr:`difffit.errors.DiffFitError.code`), ``title``, ``status`` and
``detail``; some add fields (``errors`` for invalid requests, ``task_id``
for generation timeouts, ``allowed`` for unknown classes).

Status codes:

=====================================================  ======
AdapterNotFound, JobNotFound, TenantNotFound, NotFound    404
(also every /admin route while DIFFFIT_ADMIN_KEY is unset)
Unauthorized (with ``WWW-Authenticate: Bearer``)          401
Forbidden                                                 403
InvalidRequest, InvalidDataset, IncompatibleAdapter,      422
request validation errors (type ``invalid-request``)
Conflict                                                  409
PayloadTooLarge (an upload over its size limit)           413
Overloaded (with ``Retry-After``)                         429
CorruptBlob, any other DiffFitError, unexpected errors    500
BackendUnavailable, EngineDead (with ``Retry-After``)     503
GenerationTimeout (``task_id`` in the body)               504
=====================================================  ======

422 rather than 400 is used for every "well-formed but unacceptable" request
so a client sees one status for all validation failures (FastAPI's own body
validation is 422 too). Unexpected exceptions are logged with their trace
(by ``service.middleware``, with the request id) and answered with a generic
500 that leaks nothing; 500 and 503 domain errors
are logged with their message and answered with a fixed ``detail`` per code.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from difffit import errors as E

log = logging.getLogger("difffit.service")

PROBLEM_BASE = "https://difffit.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

# Most specific first: the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[E.DiffFitError], int]] = [
    (E.NotFound, 404),
    (E.Unauthorized, 401),
    (E.Forbidden, 403),
    (E.InvalidRequest, 422),
    (E.InvalidDataset, 422),
    (E.IncompatibleAdapter, 422),
    (E.Conflict, 409),
    (E.PayloadTooLarge, 413),
    (E.Overloaded, 429),
    (E.BackendUnavailable, 503),
    (E.GenerationTimeout, 504),
    (E.CorruptBlob, 500),
]


_SAFE_DETAIL = {
    E.BackendUnavailable.code: "A backend (the registry database or the task queue) is "
    "unavailable; retry later.",
    E.CorruptBlob.code: "A stored adapter file failed its integrity check; the operator was notified.",
    E.EngineDead.code: "The worker serving this request failed and is restarting; retry shortly.",
    "internal": "Internal server error.",
}


class Problem(BaseModel):
    """An RFC 9457 problem document, as every error response carries."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(..., examples=[PROBLEM_BASE + "adapter-not-found"])
    title: str
    status: int
    detail: str


def problem_type(code: str) -> str:
    """The stable ``type`` URI of an error code."""
    return PROBLEM_BASE + code


def status_for(exc: E.DiffFitError) -> int:
    """HTTP status of a domain error (500 for anything unlisted)."""
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def _title(code: str) -> str:
    return code.replace("-", " ").capitalize()


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """Build one problem+json response."""
    body = {
        "type": problem_type(code),
        "title": title or _title(code),
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(
        jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def domain_error_response(exc: E.DiffFitError) -> JSONResponse:
    """Map one domain error to its problem response."""
    status = status_for(exc)
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(exc, E.Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, E.Overloaded):
        headers["Retry-After"] = str(max(1, int(exc.retry_after_s)))
        extra["retry_after_s"] = int(exc.retry_after_s)
    if isinstance(exc, E.GenerationTimeout):
        extra["task_id"] = exc.task_id
        if exc.task_id:
            extra["poll"] = f"/generate/{exc.task_id}"
    # Routes may attach extra problem members (e.g. `allowed` classes, readiness `checks`).
    extra.update(getattr(exc, "problem_extra", None) or {})
    code = exc.code
    detail = exc.message
    if status in (500, 503):
        # Server-side faults: the message may name hosts, paths or driver errors.
        # Log it; the client gets a fixed text for the (stable) code.
        level = getattr(exc, "log_level", logging.ERROR)
        log.log(level, "server-side error %s: %s", code, exc.message)
        detail = _SAFE_DETAIL.get(code, _SAFE_DETAIL["internal"])
    if isinstance(exc, E.BackendUnavailable):
        headers["Retry-After"] = "5"
    return problem_response(status, code, detail, headers=headers or None, **extra)


async def _domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, E.DiffFitError)
    return domain_error_response(exc)


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        where, rest = parts[0], parts[1:]
        return f"{where}.{'.'.join(rest)}" if rest else where
    return ".".join(parts)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_name(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type")}
        for err in exc.errors()
    ]
    fields = ", ".join(e["field"] for e in errors) or "request"
    return problem_response(
        422,
        E.InvalidRequest.code,
        f"Invalid request: {fields}.",
        title="Invalid request",
        errors=errors,
    )


def _http_code(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "http-error"
    return phrase.lower().replace(" ", "-").replace("'", "")


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = E.NotFound.code if status == 404 else _http_code(status)
    detail = exc.detail if isinstance(exc.detail, str) else _title(code)
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(status, code, detail, title=_title(_http_code(status)), headers=headers)


def internal_error_response() -> JSONResponse:
    """The generic 500 problem: says nothing about what failed (that goes to the log)."""
    return problem_response(500, E.DiffFitError.code, "Internal server error.", title="Internal error")


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Normally unreachable: service.middleware.RequestContextMiddleware answers first.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    app.add_exception_handler(E.DiffFitError, _domain_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)


#: Shared OpenAPI ``responses`` entries, so every route documents its problems.
def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the given error statuses, all problem+json."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {}},
        }
    return out
