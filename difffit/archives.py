"""Torch-free checks shared by the API and the worker: archives and outbound URLs.

- :func:`extract` unpacks a data set archive (zip or tar(.gz)) under the caps
  of the settings (files, unpacked bytes, compression ratio) and refuses
  unsafe members (absolute or ``..`` paths, links, special files);
- :func:`class_folders` finds the per-class folders (AutoTrain's layout);
- :func:`check_public_host` refuses URLs whose host resolves to loopback,
  private, link-local or metadata addresses (server-side request forgery),
  for data set downloads and webhook deliveries alike.

The API runs the same :func:`extract` on an uploaded data set that the
worker runs on a downloaded one, so an upload is refused with the same
message a job would fail with.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import socket
import tarfile
import urllib.parse
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from difffit.errors import DiffFitError, InvalidDataset
from difffit.settings import Settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Zip-bomb guard: refuse archives that unpack to more than this many times their size.
# Real image data sets (PNG/JPEG are already compressed) come close to 1:1.
MAX_COMPRESSION_RATIO = 100
# Below this many unpacked bytes the ratio is not checked: such an archive is harmless
# whatever its ratio, and a few solid-colour BMPs can compress 1000:1.
RATIO_FLOOR_BYTES = 8 * 1024**2
COPY_CHUNK = 1024**2
# Errors a damaged or truncated archive raises while it is read.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)


def check_public_host(
    url: str,
    settings: Settings,
    *,
    what: str = "dataset",
    error: type[DiffFitError] = InvalidDataset,
) -> None:
    """Refuse URLs whose host resolves to loopback, private, link-local or metadata addresses.

    Data set downloads check it before the first request and after every
    redirect (a public URL may redirect to an internal one); webhook
    deliveries before every attempt. DIFFFIT_ALLOW_PRIVATE_URLS lifts it.
    ``what`` names the URL in messages ("dataset", "webhook"); ``error`` is
    the error class raised.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise error(f"{what}_url must be an http(s) URL with a host; got {url!r}")
    if settings.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise error(f"cannot resolve {what} host {parsed.hostname!r}") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise error(
                f"{what} host {parsed.hostname!r} resolves to the non-public address {ip}; "
                "refused (DIFFFIT_ALLOW_PRIVATE_URLS allows it)"
            )


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidDataset(f"archive member {name!r} has an absolute or '..' path")
    return path


class _Budget:
    """Running totals of an extraction, checked against the file, size and ratio caps."""

    def __init__(self, compressed: int, settings: Settings):
        self.compressed = max(compressed, 1)
        self.settings = settings
        self.files = 0
        self.bytes = 0

    def add_file(self, name: str, declared: int) -> None:
        """Count one member before it is written, by the size its header declares."""
        self.files += 1
        if self.files > self.settings.dataset_max_files:
            raise InvalidDataset(f"archive has more than {self.settings.dataset_max_files} files")
        self.check(name, self.bytes + declared)

    def add_bytes(self, name: str, n: int) -> None:
        """Count bytes actually written (a header may understate its member's size)."""
        self.bytes += n
        self.check(name, self.bytes)

    def check(self, name: str, total: int) -> None:
        cap = self.settings.dataset_max_unpacked_bytes
        if total > cap:
            raise InvalidDataset(f"archive unpacks to more than {cap} bytes (at member {name!r})")
        ratio = total / self.compressed
        if total > RATIO_FLOOR_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise InvalidDataset(
                f"archive member {name!r} takes the archive to a compression ratio of {ratio:.0f}:1 "
                f"({total} bytes from {self.compressed}); more than {MAX_COMPRESSION_RATIO}:1 is "
                "refused as a likely zip bomb"
            )

    def copy(self, name: str, src, target: Path) -> None:
        """Stream one member to disk, counting as it goes."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                self.add_bytes(name, len(chunk))
                out.write(chunk)


def extract(data: bytes | Path, dest: Path, settings: Settings) -> None:
    """Unpack a zip or tar(.gz) into `dest`, refusing unsafe, oversized or bomb-like archives.

    ``data`` is the archive's bytes or the path of a file holding it (an
    upload spooled to disk is never read into memory whole). Caps: number of
    files, total unpacked bytes, and the compression ratio (unpacked /
    archive bytes, :data:`MAX_COMPRESSION_RATIO`). A zip declares every size
    in its directory, so it is judged before anything is written; a tar(.gz)
    is judged member by member as it streams, and the actual bytes written
    are counted in both cases.
    """
    if isinstance(data, Path):
        with data.open("rb") as fh:
            _extract_stream(fh, data.stat().st_size, dest, settings)
    else:
        _extract_stream(io.BytesIO(data), len(data), dest, settings)


def _extract_stream(fh: BinaryIO, size: int, dest: Path, settings: Settings) -> None:
    budget = _Budget(size, settings)
    try:
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            _extract_zip(fh, dest, budget)
        else:
            fh.seek(0)
            _extract_tar(fh, dest, budget)
    except ARCHIVE_ERRORS as exc:
        raise InvalidDataset(f"archive is damaged or truncated: {exc}") from exc


def _extract_zip(fh: BinaryIO, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(fh) as zf:
        # Up-front pass: judge the declared sizes before writing anything. Both passes
        # walk the zip's own directory, so no second per-member list is held (intake's
        # host memory should grow with its chunk, not with the number of files).
        declared = _Budget(budget.compressed, budget.settings)
        for info in zf.infolist():
            _safe_member(info.filename)
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise InvalidDataset(f"archive member {info.filename!r} is a symbolic link")
            declared.add_file(info.filename, info.file_size)
            declared.add_bytes(info.filename, info.file_size)
        for info in zf.infolist():
            if info.is_dir():
                continue
            budget.add_file(info.filename, info.file_size)
            with zf.open(info) as src:
                budget.copy(info.filename, src, dest / _safe_member(info.filename))


def _extract_tar(fh: BinaryIO, dest: Path, budget: _Budget) -> None:
    try:
        tf = tarfile.open(fileobj=fh, mode="r:*")  # noqa: SIM115 - closed below
    except tarfile.TarError as exc:
        raise InvalidDataset("dataset is neither a zip nor a tar(.gz) archive") from exc
    with tf:
        # Iterate (not getmembers()) so a bomb is stopped at its first big member
        # instead of being decompressed end to end just to list it.
        for member in tf:
            path = _safe_member(member.name)
            if member.isdir():
                continue
            if member.issym():
                raise InvalidDataset(f"archive member {member.name!r} is a symbolic link")
            if member.islnk():
                raise InvalidDataset(f"archive member {member.name!r} is a hard link")
            if not member.isfile():
                raise InvalidDataset(f"archive member {member.name!r} is a special file")
            budget.add_file(member.name, member.size)
            src = tf.extractfile(member)
            assert src is not None  # regular files always have data
            with src:
                budget.copy(member.name, src, dest / path)


def class_folders(root: Path) -> list[Path]:
    """The class folders: subfolders of root, or of its single top folder."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(dirs) == 1 and not files:
        inner = sorted(p for p in dirs[0].iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
        if inner:
            return inner
    return dirs


def class_files(folder: Path) -> list[Path]:
    """The files of one class folder (any depth, hidden files skipped), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
