"""The blob-store interface: content-addressed, hash-checked, atomic.

A blob is named by the sha256 hex digest of its bytes. Every implementation
keeps three promises:

- **atomic puts**: a reader sees the whole blob under its name or nothing,
  even when the writer dies half way (file: temp file + rename; S3: one PUT,
  or a multipart upload, which only becomes visible when completed);
- **verified reads**: every read re-hashes the bytes and raises CorruptBlob
  on a mismatch, so damaged storage never feeds garbage to the engine;
- **a fresh timestamp on every put**: putting a blob that already exists
  refreshes its modification time. `difffit gc` spares blobs younger than a
  grace period, and a writer that re-puts an old orphan before registering it
  must not see it collected in between.

Implementations: `FileBlobStore` (a folder, ``file://``) and `S3BlobStore`
(``s3://bucket/prefix`` on any S3-compatible service).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from difffit.errors import CorruptBlob, InvalidRequest

CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")
_HASHERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="blob-sha256")


def _check_digest(sha256: str, actual: str, where: str) -> None:
    if actual != sha256:
        raise CorruptBlob(f"blob {sha256} at {where} is corrupt: its content hashes to {actual}")


def check_sha(sha256: object) -> str:
    """`sha256` if it is 64 lowercase hex characters, else InvalidRequest.

    Also what keeps a blob name from leaving the store (no ``/``, no ``..``).
    """
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        raise InvalidRequest(f"invalid blob hash {sha256!r}: expected 64 lowercase hex characters")
    return sha256


def fan_out(sha256: str) -> str:
    """``ab/cd/<sha256>``: the relative name of a blob in both stores."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob as a listing sees it (gc's input)."""

    sha256: str
    size: int
    modified: datetime  # aware UTC: the store's clock (mtime, S3 LastModified)


def verified_chunks(sha256: str, chunks: Iterable[bytes], where: str) -> Iterator[bytes]:
    """Yield `chunks`, holding the last one back until the whole blob hashes to `sha256`.

    A consumer therefore never receives the complete content of a corrupt
    blob: it gets CorruptBlob before the final chunk. A blob of one chunk is
    checked before anything is yielded, so a caller that primes the iterator
    (calls ``next`` once) learns about NotFound/CorruptBlob before it answers.
    """
    digest = hashlib.sha256()
    held: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        digest.update(chunk)
        if held is not None:
            yield held
        held = chunk
    actual = digest.hexdigest()
    if actual != sha256:
        raise CorruptBlob(f"blob {sha256} at {where} is corrupt: its content hashes to {actual}")
    if held is not None:
        yield held


class BlobStore(ABC):
    """Blobs addressed by their sha256 hex digest (see the module docstring)."""

    #: The store's URL (``file:///...`` or ``s3://bucket/prefix``), for logs and messages.
    url: str

    # -- writing ---------------------------------------------------------------
    @abstractmethod
    def put_bytes(self, data: bytes) -> str:
        """Store `data` atomically and return its sha256 (refreshes the timestamp if present)."""

    @abstractmethod
    def put_file(self, path: Path) -> str:
        """Store a copy of the file at `path` atomically and return its sha256.

        NotFound when the file does not exist. The stored bytes are exactly
        the ones hashed, even if the source changes while it is read.
        """

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove blob `sha256`; a missing blob is not an error."""

    def delete_many(self, shas: Iterable[str]) -> None:
        """Remove several blobs (missing ones are fine); stores batch where they can."""
        for sha in shas:
            self.delete(sha)

    # -- reading ---------------------------------------------------------------
    @abstractmethod
    def _read(self, sha256: str) -> tuple[bytes, str]:
        """(content, where) of blob `sha256`, not yet verified; NotFound when absent."""

    def get_bytes(self, sha256: str) -> bytes:
        """The content of blob `sha256`, verified; NotFound or CorruptBlob otherwise."""
        data, where = self._read(sha256)
        _check_digest(sha256, hashlib.sha256(data).hexdigest(), where)
        return data

    def get_parsed(self, sha256: str, parse: Callable[[bytes], T]) -> T:
        """``parse(content)`` of blob `sha256`, the content verified beside the parse.

        hashlib releases the GIL on large buffers, so the sha256 runs on a
        helper thread while this one parses: a cold adapter load pays for the
        longer of the two, not their sum. A mismatch raises CorruptBlob whatever
        the parse returned or raised (the content is not what was stored).
        """
        data, where = self._read(sha256)
        digest = _HASHERS.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            result = parse(data)
        except BaseException:
            _check_digest(sha256, digest.result(), where)
            raise
        _check_digest(sha256, digest.result(), where)
        return result

    @abstractmethod
    def iter_verified(self, sha256: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The content in chunks, for streaming; checked as `verified_chunks` describes.

        NotFound is raised on the first ``next``.
        """

    @abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether blob `sha256` is present (its content is not checked)."""

    @abstractmethod
    def size(self, sha256: str) -> int:
        """Size in bytes of blob `sha256`; NotFound when absent."""

    @abstractmethod
    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob in the store, in no particular order (names that are not a sha256 are skipped)."""

    def download_url(self, sha256: str, *, ttl_s: int, filename: str, media_type: str) -> str | None:
        """A short-lived URL a client can fetch the blob from directly, or None (stream it instead)."""
        return None

    # -- maintenance -------------------------------------------------------------
    @abstractmethod
    def remove_stale_uploads(self, older_than: datetime) -> int:
        """Remove debris of uploads that died before `older_than` (temp files, open multipart
        uploads); return how many. Never touches a complete blob."""

    @abstractmethod
    def ping(self) -> None:
        """Raise BackendUnavailable unless the store answers (readiness probes)."""
