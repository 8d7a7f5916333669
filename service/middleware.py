"""Request ids, the access log line and the last-resort 500 (outermost middleware).

Every request gets an id: the client's ``X-Request-ID`` when it is a sane
token (at most 128 characters of letters, digits and ``._:-``; anything
else could forge log lines), otherwise a fresh one. The id is echoed in the
response's ``X-Request-ID`` header and tagged onto every log line written
while the request is served (see :mod:`difffit.logging_setup`).

An exception that escapes the app is answered here with the generic 500
problem (and the header), and logged with its trace and the request id;
Starlette's own ServerErrorMiddleware sits outside user middleware, so
without this a crashed request would lose both.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from difffit.logging_setup import log_context
from service.errors import internal_error_response

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("difffit.access")
#: Probes and scrapes that succeed are logged at DEBUG: they come every few seconds.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
log = logging.getLogger("difffit.service")


def request_id_from(scope: Scope) -> str:
    """The client's request id when it is a sane token, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if _SANE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Pure ASGI (safe with streaming responses such as SSE)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())
        status = 500
        started = False
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        with log_context(request_id=rid):
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if started:
                    raise  # too late for a problem response; the server closes the connection
                await internal_error_response()(scope, receive, send_wrapper)
            finally:
                path = scope.get("path", "")
                quiet = path in QUIET_PATHS and status < 400
                access_log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "%s %s %d",
                    scope.get("method", ""),
                    path,
                    status,
                    extra={
                        "method": scope.get("method", ""),
                        "path": path,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    },
                )
