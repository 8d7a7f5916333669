"""A Python client for a DiffFit Serve deployment (torch-free: httpx only).

    from difffit.client import Client

    with Client("http://127.0.0.1:8000", "dfs_...") as c:
        ds = c.upload_dataset("./shades")            # a folder per class, zipped for you
        job = c.finetune(dataset_id=ds["id"], adapter="shades", steps=200)
        job = c.wait(job["id"])                        # follows the job's event stream
        [img] = c.generate(adapter="shades", class_="light", seed=3)   # PIL images

The server URL and key default to ``DIFFFIT_URL`` and ``DIFFFIT_API_KEY``.
Every error answer becomes an :class:`APIError` subclass carrying the
problem+json body. A 429 (or 503) is retried after its ``Retry-After``, up
to ``max_retries`` times; a ``/generate`` that outlives the server's wait
(504 with a ``task_id``) is polled at ``GET /generate/{task_id}`` until its
images are ready. Pillow is imported only by :meth:`Client.generate`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
SIGNATURE_HEADER = "X-DiffFit-Signature"


# --- errors ---------------------------------------------------------------------
class APIError(Exception):
    """An error answer of the API; ``problem`` is its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any], headers: httpx.Headers | None = None):
        self.status = status
        self.problem = problem
        self.headers = headers or httpx.Headers()
        self.code = str(problem.get("type", "")).rsplit("/", 1)[-1] or f"http-{status}"
        self.detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
        super().__init__(f"{status} {self.code}: {self.detail}")


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key."""


class NotFoundError(APIError):
    """404: no such adapter, job or data set for this tenant."""


class ConflictError(APIError):
    """409: e.g. an idempotency key reused with another body, a data set in use."""


class PayloadTooLargeError(APIError):
    """413: an upload over the server's size limit."""


class InvalidRequestError(APIError):
    """422: the request (or the uploaded data) is not acceptable; ``detail`` says why."""


class RateLimitError(APIError):
    """429 after every retry: the server's queues stayed full."""


class ServerError(APIError):
    """5xx: the server or one of its backends failed."""


class JobFailedError(Exception):
    """Raised by :meth:`Client.wait` with ``raise_on_failure=True`` for a job that did not succeed."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        error = job.get("error") or {}
        super().__init__(
            f"job {job.get('id')} {job.get('state')}: {error.get('code')} {error.get('message')}"
        )


_ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
}


def _error(resp: httpx.Response) -> APIError:
    try:
        problem = resp.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"detail": resp.text[:500] or resp.reason_phrase}
    cls = _ERRORS_BY_STATUS.get(resp.status_code, ServerError if resp.status_code >= 500 else APIError)
    return cls(resp.status_code, problem, resp.headers)


# --- webhooks -------------------------------------------------------------------
def sign_webhook(secret: str, body: bytes) -> str:
    """The ``X-DiffFit-Signature`` value of a webhook body: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_webhook(secret: str, body: bytes, signature: str | None) -> bool:
    """True when ``signature`` (the header's value) signs the raw ``body`` under ``secret``."""
    return bool(signature) and hmac.compare_digest(sign_webhook(secret, body), str(signature))


# --- events ---------------------------------------------------------------------
@dataclass
class Event:
    """One server-sent event of a job: ``kind`` (``running``, ``progress``, ``preview``,
    ``succeeded``, ..., ``end``), its JSON ``data`` and its ``id`` (None for ``end``)."""

    kind: str
    data: Any
    id: int | None


def zip_folder(folder: Path, out: Path) -> Path:
    """Zip a folder-per-class directory (paths relative to it, hidden files skipped)."""
    folder = Path(folder)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                zf.write(path, rel.as_posix())
    return out


# --- the client -------------------------------------------------------------------
class Client:
    """One tenant's session with a DiffFit Serve API (thread-safe as httpx.Client is)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 60.0,
        poll_interval_s: float = 1.0,
        http_client: httpx.Client | None = None,
    ):
        self.base_url = (base_url or os.environ.get("DIFFFIT_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("DIFFFIT_API_KEY")
        if not self.api_key:
            raise ValueError("an API key is needed: pass api_key= or set DIFFFIT_API_KEY")
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.poll_interval_s = poll_interval_s
        self._own_http = http_client is None
        self.http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout)
        self._auth = {"Authorization": f"Bearer {self.api_key}"}

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------
    def _url(self, path: str) -> str:
        return path if self.http.base_url.host else f"{self.base_url}{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; retry 429/503 after Retry-After; raise APIError on errors.

        A body given as a callable (``content=lambda: ...``) is rebuilt for each try.
        """
        headers = {**self._auth, **kwargs.pop("headers", {})}
        make_files = kwargs.pop("files_factory", None)
        for attempt in range(self.max_retries + 1):
            if make_files is not None:
                kwargs["files"] = make_files()
            try:
                resp = self.http.request(method, self._url(path), headers=headers, **kwargs)
            finally:
                for part in (kwargs.get("files") or {}).values() if make_files else ():
                    part[1].close()
            if resp.status_code in (429, 503) and attempt < self.max_retries:
                time.sleep(self._retry_after(resp, attempt))
                continue
            if resp.status_code >= 400:
                raise _error(resp)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _retry_after(self, resp: httpx.Response, attempt: int) -> float:
        value = resp.headers.get("Retry-After", "")
        try:
            wait = float(value)
        except ValueError:
            wait = min(2.0**attempt, 30.0)
        return max(0.0, min(wait, self.max_retry_wait_s))

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # -- data sets ---------------------------------------------------------------
    def upload_dataset(self, path_or_folder: str | os.PathLike[str]) -> dict[str, Any]:
        """Upload a zip/tar archive, or a folder with one subfolder per class (zipped here).

        Returns the data set: ``id`` (pass it as ``dataset_id``), ``sha256``,
        ``classes``, ``class_counts``, ``images``.
        """
        path = Path(path_or_folder)
        if path.is_dir():
            with tempfile.TemporaryDirectory(prefix="difffit-upload-") as tmp:
                archive = zip_folder(path, Path(tmp) / f"{path.resolve().name or 'dataset'}.zip")
                return self._upload_file("/datasets", archive)
        if not path.is_file():
            raise FileNotFoundError(f"no such file or folder: {path}")
        return self._upload_file("/datasets", path)

    def _upload_file(self, route: str, path: Path) -> Any:
        def files() -> dict[str, Any]:
            return {"file": (path.name, path.open("rb"), "application/octet-stream")}

        return self._json("POST", route, files_factory=files)

    def datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/datasets")["datasets"]

    def delete_dataset(self, dataset_id: str) -> None:
        self.request("DELETE", f"/datasets/{dataset_id}")

    # -- jobs --------------------------------------------------------------------
    def finetune(self, *, idempotency_key: str | None = None, **body: Any) -> dict[str, Any]:
        """Start a fine-tune; keyword arguments are the JSON fields of ``POST /finetune``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {k: v for k, v in body.items() if v is not None}
        return self._json("POST", "/finetune", json=body, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{job_id}")

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._json("GET", "/jobs", params={"limit": limit})["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: int | None = None) -> Iterator[Event]:
        """The job's server-sent events, replayed then live, ending with ``end`` (the job).

        A dropped connection is resumed from the last event id.
        """
        last = after or 0
        failures = 0
        while True:
            try:
                with self.http.stream(
                    "GET",
                    self._url(f"/jobs/{job_id}/events"),
                    headers={**self._auth, "Accept": "text/event-stream", "Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(10.0, read=60.0),
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise _error(resp)
                    for event in _parse_sse(resp.iter_lines()):
                        failures = 0
                        if event.id is not None:
                            last = event.id
                        yield event
                        if event.kind == "end":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > self.max_retries:
                    raise
                time.sleep(min(2.0**failures, 10.0))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        raise_on_failure: bool = False,
    ) -> dict[str, Any]:
        """Follow the job until it is terminal and return it (``state`` tells how it ended)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job: dict[str, Any] | None = None
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
            if event.kind == "end":
                job = event.data
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s")
        job = job or self.job(job_id)
        if raise_on_failure and job.get("state") != "succeeded":
            raise JobFailedError(job)
        return job

    # -- generate ----------------------------------------------------------------
    def generate_png(
        self,
        adapter: str | None = None,
        class_: int | str = 0,
        n: int = 1,
        seed: int | None = None,
        *,
        version: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        timeout: float = 3600.0,
    ) -> list[bytes]:
        """Sample ``n`` images of ``class_`` (index or name); returns the PNG bytes.

        ``adapter=None`` samples the base model. A 504 (the server's wait ran
        out) is followed by polling ``GET /generate/{task_id}``.
        """
        params: dict[str, Any] = {"class": class_, "n": n}
        for key, value in (
            ("adapter", adapter),
            ("seed", seed),
            ("version", version),
            ("steps", steps),
            ("guidance_scale", guidance_scale),
            ("scheduler", scheduler),
        ):
            if value is not None:
                params[key] = value
        try:
            body = self._json("POST", "/generate", params=params, headers={"Accept": "application/json"})
        except ServerError as exc:
            task_id = exc.problem.get("task_id")
            if exc.status != 504 or not task_id:
                raise
            body = self._poll_generate(str(task_id), timeout)
        return [base64.b64decode(b) for b in body["images"]]

    def _poll_generate(self, task_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._json("GET", f"/generate/{task_id}")
            if status.get("state") == "succeeded":
                return status
            time.sleep(self.poll_interval_s)
        raise TimeoutError(f"generate request {task_id} not done after {timeout} s")

    def generate(
        self,
        adapter: str | None = None,
        class_: int | str = 0,
        n: int = 1,
        seed: int | None = None,
        **kw: Any,
    ):
        """Like :meth:`generate_png`, decoded: a list of ``PIL.Image.Image``."""
        from PIL import Image

        images = []
        for png in self.generate_png(adapter, class_, n, seed, **kw):
            img = Image.open(io.BytesIO(png))
            img.load()
            images.append(img)
        return images

    # -- adapters ----------------------------------------------------------------
    def adapters(self) -> list[dict[str, Any]]:
        return self._json("GET", "/adapters")["adapters"]

    def adapter(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/adapters/{name}")

    def delete_adapter(self, name: str) -> None:
        self.request("DELETE", f"/adapters/{name}")

    def version_file(self, name: str, version: int, filename: str) -> bytes:
        """A file of an adapter version: ``adapter.safetensors``, ``samples.png``, ``loss.json``."""
        return self.request("GET", f"/adapters/{name}/versions/{version}/files/{filename}").content

    def download_adapter(self, name: str, version: int | None, path: str | os.PathLike[str]) -> Path:
        """Write an adapter version's ``.safetensors`` file (``version=None``: the latest) to ``path``."""
        if version is None:
            version = int(self.adapter(name)["latest_version"])
        data = self.version_file(name, version, "adapter.safetensors")
        out = Path(path)
        out.write_bytes(data)
        return out

    def import_adapter(self, name: str, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Register an adapter file (e.g. downloaded from another deployment) as a new version."""
        return self._upload_file(f"/adapters/{name}/versions", Path(path))

    # -- webhooks ----------------------------------------------------------------
    def webhook_secret(self) -> str:
        """The secret that signs this tenant's webhooks (``X-DiffFit-Signature``)."""
        return self._json("GET", "/webhooks/secret")["secret"]

    def rotate_webhook_secret(self) -> str:
        return self._json("POST", "/webhooks/secret/rotate")["secret"]


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    kind, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    value = json.loads(raw)
                except ValueError:
                    value = raw
                yield Event(kind, value, int(event_id) if event_id and event_id.isdigit() else None)
            kind, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue  # keep-alive comment
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value
