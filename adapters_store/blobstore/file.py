"""The folder store (``file:///path``): a blob lives at ``root/ab/cd/<sha256>``.

Writes go to a temporary file in the destination folder and are renamed into
place with ``os.replace``, so a reader sees either the whole blob or none,
even if the writer dies half way (its ``.tmp`` debris is removed by
`remove_stale_uploads`). Every read re-hashes the content. A shared folder
(NFS, CephFS) with atomic rename works across hosts; object storage is the
usual choice there (`S3BlobStore`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from adapters_store.blobstore.base import (
    CHUNK,
    SHA256,
    BlobInfo,
    BlobStore,
    check_sha,
    fan_out,
    verified_chunks,
)
from difffit.errors import BackendUnavailable, CorruptBlob, InvalidRequest, NotFound

TMP_SUFFIX = ".tmp"


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a
    # directory, and the data is already safe in that case, so ignore it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileBlobStore(BlobStore):
    """Files addressed by their sha256 hex digest under `root`."""

    def __init__(self, root: Path) -> None:
        """Use (and create if needed) the folder `root`."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.resolve().as_uri()

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.root)!r})"

    def path_for(self, sha256: str) -> Path:
        """Where the blob `sha256` lives (whether or not it exists); InvalidRequest for a bad hash."""
        return self.root / fan_out(check_sha(sha256))

    def put_bytes(self, data: bytes) -> str:
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha)
        if not self._intact_refreshed(path, sha):
            self._write_atomic(path, sha, [data])
        return sha

    def put_file(self, path: Path) -> str:
        """See `BlobStore.put_file`: hashed, then copied and re-hashed (refused if it changed)."""
        src = Path(path)
        if not src.is_file():
            raise NotFound(f"file to store {str(src)!r} does not exist")
        sha = _hash_file(src)
        dest = self.path_for(sha)
        if self._intact_refreshed(dest, sha):
            return sha

        def chunks() -> Iterable[bytes]:
            with src.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        self._write_atomic(dest, sha, chunks())
        return sha

    def _read(self, sha256: str) -> tuple[bytes, str]:
        path = self.path_for(sha256)
        try:
            return path.read_bytes(), str(path)
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found at {path}") from None

    def iter_verified(self, sha256: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self.path_for(sha256)

        def chunks() -> Iterator[bytes]:
            try:
                fh = path.open("rb")
            except FileNotFoundError:
                raise NotFound(f"blob {sha256} not found at {path}") from None
            with fh:
                while chunk := fh.read(chunk_size):
                    yield chunk

        return verified_chunks(sha256, chunks(), str(path))

    def open_verified(self, sha256: str) -> Path:
        """Verify blob `sha256` on disk and return its path (for mmap-style loaders)."""
        path = self.path_for(sha256)
        try:
            actual = _hash_file(path)
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found at {path}") from None
        if actual != sha256:
            raise CorruptBlob(f"blob {sha256} at {path} is corrupt: its content hashes to {actual}")
        return path

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def delete(self, sha256: str) -> None:
        # Empty fan-out folders stay: removing one could race a put that just created it.
        with contextlib.suppress(FileNotFoundError):
            self.path_for(sha256).unlink()

    def size(self, sha256: str) -> int:
        path = self.path_for(sha256)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found at {path}") from None

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for path in self.root.glob("??/??/*"):
            if not SHA256.fullmatch(path.name) or path.parent.parent.name != path.name[:2]:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            yield BlobInfo(path.name, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def remove_stale_uploads(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()
        removed = 0
        for path in self.root.glob(f"??/??/.*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise BackendUnavailable(f"blob folder {self.root} is missing or not writable")

    def _intact_refreshed(self, path: Path, sha: str) -> bool:
        # Re-hashing an existing copy lets a second put repair a blob that
        # was damaged on disk instead of silently keeping the bad bytes; the
        # touch restarts gc's grace period for a writer about to register it.
        try:
            intact = _hash_file(path) == sha
        except FileNotFoundError:
            return False
        if intact:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
        return intact

    def _write_atomic(self, dest: Path, sha: str, chunks: Iterable[bytes]) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{sha}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        digest = hashlib.sha256()
        try:
            with tmp.open("xb") as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if digest.hexdigest() != sha:
                raise InvalidRequest(
                    f"content changed while being stored: expected sha256 {sha}, wrote {digest.hexdigest()}"
                )
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(dest.parent)
