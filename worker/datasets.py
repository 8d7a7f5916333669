"""Dataset intake: URL -> archive -> class folders -> image tensor.

The layout is AutoTrain's: a zip or tar(.gz) with one folder per class
(optionally under one top folder); class names are the folder names, in
sorted order. Every failure is an :class:`InvalidDataset` whose message
says what is wrong and, for bad images, which files.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import socket
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from difffit.errors import InvalidDataset
from difffit.settings import Settings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_REDIRECTS = 5
Image.MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: PIL raises above 2x this
# Zip-bomb guard: refuse archives that unpack to more than this many times their size.
# Real image data sets (PNG/JPEG are already compressed) come close to 1:1.
MAX_COMPRESSION_RATIO = 100
# Below this many unpacked bytes the ratio is not checked: such an archive is harmless
# whatever its ratio, and a few solid-colour BMPs can compress 1000:1.
RATIO_FLOOR_BYTES = 8 * 1024**2
COPY_CHUNK = 1024**2
# Errors a damaged or truncated archive raises while it is read.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass
class ImageSet:
    """Decoded images: pixels [N, C, H, W] float32 in [-1, 1], labels [N], class names."""

    pixels: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def fetch(url: str, settings: Settings) -> bytes:
    """Download a dataset archive, bounded in size and in total time; file:// only when enabled.

    ``settings.dataset_timeout_s`` is a wall-clock budget for the whole
    download (DNS checks, redirects and body): a server that drips one byte
    at a time never trips a per-read timeout, so it is enforced here.
    """
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "file":
        if not settings.allow_file_urls:
            raise InvalidDataset("file:// dataset URLs are disabled (DIFFFIT_ALLOW_FILE_URLS)")
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        if not path.is_file():
            raise InvalidDataset(f"dataset file {path} does not exist")
        if path.stat().st_size > settings.dataset_max_bytes:
            raise InvalidDataset(f"dataset is larger than {settings.dataset_max_bytes} bytes")
        return path.read_bytes()
    if scheme not in ("http", "https"):
        raise InvalidDataset(f"dataset_url scheme must be http, https or file; got {scheme!r}")

    # The download runs in a helper thread so that the caller gets its answer at
    # the deadline even when a read or a DNS lookup blocks; the helper checks the
    # same deadline between chunks and stops by itself soon after.
    deadline = time.monotonic() + settings.dataset_timeout_s
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["data"] = _download(url, settings, deadline)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    helper = threading.Thread(target=run, name="dataset-download", daemon=True)
    helper.start()
    helper.join(timeout=max(0.0, deadline - time.monotonic()) + 0.05)
    if helper.is_alive():
        raise _too_slow(url, settings)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["data"]  # type: ignore[return-value]


def _download(url: str, settings: Settings, deadline: float) -> bytes:
    """The http(s) download proper: SSRF check per hop, size cap, and the deadline between chunks."""
    import httpx

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _too_slow(url, settings)
        return left

    buf = io.BytesIO()
    try:
        with httpx.Client(timeout=settings.dataset_timeout_s, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                check_public_host(url, settings)
                # Each hop may only use what is left of the budget, per read too.
                with client.stream("GET", url, timeout=time_left()) as r:
                    if r.is_redirect:
                        url = str(r.url.join(r.headers["location"]))
                        continue
                    if r.status_code != 200:
                        raise InvalidDataset(f"downloading {url} gave HTTP {r.status_code}")
                    for chunk in r.iter_bytes():
                        buf.write(chunk)
                        if buf.tell() > settings.dataset_max_bytes:
                            raise InvalidDataset(f"dataset is larger than {settings.dataset_max_bytes} bytes")
                        time_left()
                    return buf.getvalue()
    except httpx.TimeoutException as exc:
        raise _too_slow(url, settings) from exc
    except httpx.HTTPError as exc:
        raise InvalidDataset(f"could not download {url}: {exc}") from exc
    raise InvalidDataset(f"more than {MAX_REDIRECTS} redirects")


def _too_slow(url: str, settings: Settings) -> InvalidDataset:
    return InvalidDataset(
        f"downloading {url} took longer than {settings.dataset_timeout_s:g} s (DIFFFIT_DATASET_TIMEOUT_S)"
    )


def check_public_host(url: str, settings: Settings) -> None:
    """Refuse URLs whose host resolves to loopback, private, link-local or metadata addresses.

    Checked before the first request and again after every redirect, since a
    public URL may redirect to an internal one. DIFFFIT_ALLOW_PRIVATE_URLS lifts it.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidDataset(f"dataset_url must be an http(s) URL with a host; got {url!r}")
    if settings.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise InvalidDataset(f"cannot resolve dataset host {parsed.hostname!r}") from exc
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise InvalidDataset(
                f"dataset host {parsed.hostname!r} resolves to the non-public address {ip}; "
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


def extract(data: bytes, dest: Path, settings: Settings) -> None:
    """Unpack a zip or tar(.gz) into `dest`, refusing unsafe, oversized or bomb-like archives.

    Caps: number of files, total unpacked bytes, and the compression ratio
    (unpacked / archive bytes, :data:`MAX_COMPRESSION_RATIO`). A zip declares
    every size in its directory, so it is judged before anything is written;
    a tar(.gz) is judged member by member as it streams, and the actual bytes
    written are counted in both cases.
    """
    budget = _Budget(len(data), settings)
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            _extract_zip(data, dest, budget)
        else:
            _extract_tar(data, dest, budget)
    except ARCHIVE_ERRORS as exc:
        raise InvalidDataset(f"archive is damaged or truncated: {exc}") from exc


def _extract_zip(data: bytes, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        # Up-front pass: judge the declared sizes before writing anything.
        members = []
        declared = _Budget(budget.compressed, budget.settings)
        for info in zf.infolist():
            path = _safe_member(info.filename)
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise InvalidDataset(f"archive member {info.filename!r} is a symbolic link")
            declared.add_file(info.filename, info.file_size)
            declared.add_bytes(info.filename, info.file_size)
            members.append((info, path))
        for info, path in members:
            budget.add_file(info.filename, info.file_size)
            with zf.open(info) as src:
                budget.copy(info.filename, src, dest / path)


def _extract_tar(data: bytes, dest: Path, budget: _Budget) -> None:
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 - closed below
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


def load_image(path: Path, channels: int, size: int) -> np.ndarray:
    """Decode, convert (any mode) to L or RGB, center-crop and resize: [C, size, size] in [-1, 1].

    16-bit greyscale is scaled (65535 -> 255), not stretched, so brightness
    keeps its meaning; alpha (RGBA, LA, PA, P with transparency) is composited
    on black; CMYK, YCbCr, 1-bit and the rest go through PIL's conversion.
    """
    with Image.open(path) as img:
        img.load()
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = np.asarray(img, dtype=np.float32)
            # Mode "I" may hold 8-bit data (converted images); only a real 16-bit range is scaled.
            scale = 257.0 if img.mode != "I" or arr.max() > 255 else 1.0
            img = Image.fromarray(np.clip(arr / scale, 0, 255).round().astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA", "P"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        img = img.resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folders(root: Path, channels: int, size: int, max_bad_listed: int = 5) -> ImageSet:
    """Read class folders under `root` into an :class:`ImageSet`."""
    folders = class_folders(root)
    if not folders:
        raise InvalidDataset("dataset has no class folders: expected one folder per class with images in it")
    if len(folders) < 2:
        raise InvalidDataset(f"dataset has only one class folder ({folders[0].name!r}); need at least 2")
    pixels, labels, bad = [], [], []
    names = [f.name for f in folders]
    empty = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        found = 0
        for path in files:
            try:
                pixels.append(load_image(path, channels, size))
                labels.append(label)
                found += 1
            except Image.DecompressionBombError as exc:
                # PIL refuses before decoding: the declared size alone is over the limit.
                bad.append(f"{path.relative_to(root)} (decompression bomb: {exc})")
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                kind = "not an image" if path.suffix.lower() not in IMAGE_SUFFIXES else "corrupt image"
                bad.append(f"{path.relative_to(root)} ({kind}: {type(exc).__name__})")
        if found == 0:
            empty.append(folder.name)
    if bad:
        listed = "; ".join(bad[:max_bad_listed])
        more = f" and {len(bad) - max_bad_listed} more" if len(bad) > max_bad_listed else ""
        raise InvalidDataset(f"{len(bad)} files could not be read as images: {listed}{more}")
    if not pixels:
        raise InvalidDataset("dataset has zero images")
    if empty:
        raise InvalidDataset(f"class folders with no images: {', '.join(empty)}")
    return ImageSet(np.stack(pixels), np.asarray(labels, dtype=np.int64), names)


def load_dataset(url: str, settings: Settings, channels: int, size: int) -> ImageSet:
    """Fetch, unpack and decode a dataset URL (the whole intake, for the finetune task)."""
    data = fetch(url, settings)
    with tempfile.TemporaryDirectory(prefix="difffit-ds-") as tmp:
        extract(data, Path(tmp), settings)
        return load_image_folders(Path(tmp), channels, size)
