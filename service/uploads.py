"""Receive an uploaded file into a temporary file, never past a size limit.

Starlette's ``request.form()`` spools every file part to disk whatever its
size before a route sees it, so a client could fill the disk with one
request. Here the body is parsed as it streams (python-multipart's push
parser) and the upload is refused with 413 as soon as it passes
``max_bytes`` (at once when ``Content-Length`` already says so).

Two body shapes are accepted:

- ``multipart/form-data`` with the file in the field named ``field``
  (``curl -F file=@data.zip``; what browsers and the Python client send);
- the raw file as the whole body with any other content type
  (``curl --data-binary @data.zip -H 'Content-Type: application/zip'``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from difffit.errors import InvalidRequest, PayloadTooLarge


@dataclass
class Upload:
    """A received file: where it sits, its client-side name, its size in bytes."""

    path: Path
    filename: str | None
    size: int
    #: What the route found checking it (e.g. a data set's classes).
    summary: Any = None


class _Sink:
    """The temp file and the running count, shared by the parser callbacks."""

    def __init__(self, fh, max_bytes: int, what: str):
        self.fh, self.max_bytes, self.what = fh, max_bytes, what
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise _too_large(self.what, self.max_bytes)
        self.fh.write(data)


def upload_openapi(raw_media_type: str) -> dict:
    """The OpenAPI request body of an upload route: multipart field ``file`` or the raw body."""
    binary = {"type": "string", "format": "binary"}
    multipart = {"type": "object", "properties": {"file": binary}, "required": ["file"]}
    content = {"multipart/form-data": {"schema": multipart}, raw_media_type: {"schema": binary}}
    return {"requestBody": {"required": True, "content": content}}


def _too_large(what: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is larger than this server's limit of {max_bytes} bytes.")


@contextlib.contextmanager
def _temp_file(folder: Path) -> Iterator[tuple[Path, object]]:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=folder)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield path, fh
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def receive_upload(
    request: Request, *, folder: Path, max_bytes: int, what: str, field: str = "file"
) -> Upload:
    """Stream the request's file into a new file under ``folder``; the caller deletes it.

    Raises PayloadTooLarge (413) past ``max_bytes`` and InvalidRequest (422)
    for a multipart body without the field or with an empty file; nothing is
    left on disk when it raises.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        # Multipart framing adds a little; anything this far above is over for sure.
        raise _too_large(what, max_bytes)
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    with _temp_file(folder) as (path, fh):
        sink = _Sink(fh, max_bytes, what)
        if content_type == b"multipart/form-data":
            filename = await _receive_multipart(request, params, sink, field)
        else:
            filename = None
            async for chunk in request.stream():
                sink.write(chunk)
        if sink.size == 0:
            raise InvalidRequest(f"{field}: the uploaded {what} is empty.")
    return Upload(path=path, filename=filename, size=sink.size)


async def _receive_multipart(request: Request, params: dict, sink: _Sink, field: str) -> str | None:
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart body without a boundary parameter in Content-Type.")
    state: dict = {"headers": {}, "field": b"", "value": b"", "current": None, "found": False, "name": None}

    def on_part_begin() -> None:
        state["headers"], state["current"] = {}, None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name == field and not state["found"]:
            state["current"], state["found"] = "file", True
            raw = opts.get(b"filename")
            state["name"] = raw.decode("utf-8", "replace") if raw else None
        else:
            state["current"] = None  # other fields are read past and dropped

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["current"] == "file":
            sink.write(data[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    # Other fields are dropped, not stored, but the whole body is bounded too.
    body_limit, received = sink.max_bytes + 1024**2, 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _too_large(sink.what, sink.max_bytes)
            parser.write(chunk)
        parser.finalize()
    except (PayloadTooLarge, InvalidRequest):
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    if not state["found"]:
        raise InvalidRequest(f"{field}: the multipart body has no field named {field!r}.")
    return state["name"]
