"""Content-addressed blob store on a local (or shared) folder.

A blob lives at ``root/ab/cd/<sha256>`` where ``abcd`` are the first hex
digits of its sha256. Writes go to a temporary file in the destination
folder and are renamed into place with ``os.replace``, so a reader sees
either the whole blob or none, even if the writer dies half way. Every
read re-hashes the content: a file damaged on disk raises CorruptBlob
instead of feeding garbage to the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from difffit.errors import CorruptBlob, InvalidRequest, NotFound

CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


class BlobStore:
    """Files addressed by their sha256 hex digest under `root`."""

    def __init__(self, root: Path) -> None:
        """Use (and create if needed) the folder `root`."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def path_for(self, sha256: str) -> Path:
        """Where the blob `sha256` lives (whether or not it exists).

        The argument must be 64 lowercase hex characters, which also
        guarantees that the path cannot leave the store's root.
        """
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise InvalidRequest(f"invalid blob hash {sha256!r}: expected 64 lowercase hex characters")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put_bytes(self, data: bytes) -> str:
        """Store `data` and return its sha256 (a no-op if an intact copy exists)."""
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha)
        if not self._intact(path, sha):
            self._write_atomic(path, sha, [data])
        return sha

    def put_file(self, path: Path) -> str:
        """Store a copy of the file at `path` and return its sha256.

        The file is read twice (hash, then copy) so the temporary copy can
        sit in the destination folder; the copy is re-hashed and refused if
        the source changed in between.
        """
        src = Path(path)
        if not src.is_file():
            raise NotFound(f"file to store {str(src)!r} does not exist")
        sha = _hash_file(src)
        dest = self.path_for(sha)
        if self._intact(dest, sha):
            return sha

        def chunks() -> Iterable[bytes]:
            with src.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        self._write_atomic(dest, sha, chunks())
        return sha

    def get_bytes(self, sha256: str) -> bytes:
        """The content of blob `sha256`, verified; NotFound or CorruptBlob otherwise."""
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found at {path}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CorruptBlob(f"blob {sha256} at {path} is corrupt: its content hashes to {actual}")
        return data

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
        """Whether blob `sha256` is present (its content is not checked)."""
        return self.path_for(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove blob `sha256`; a missing blob is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.path_for(sha256).unlink()

    def size(self, sha256: str) -> int:
        """Size in bytes of blob `sha256`; NotFound when absent."""
        path = self.path_for(sha256)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found at {path}") from None

    def _intact(self, path: Path, sha: str) -> bool:
        # Re-hashing an existing copy lets a second put repair a blob that
        # was damaged on disk instead of silently keeping the bad bytes.
        try:
            return _hash_file(path) == sha
        except FileNotFoundError:
            return False

    def _write_atomic(self, dest: Path, sha: str, chunks: Iterable[bytes]) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{sha}.{secrets.token_hex(6)}.tmp"
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
