"""Dataset intake: URL -> archive -> class folders -> decoded images, chunk by chunk.

The layout is AutoTrain's: a zip or tar(.gz) with one folder per class
(optionally under one top folder); class names are the folder names, in
sorted order. Every failure is an :class:`InvalidDataset` whose message
says what is wrong and, for bad images, which files.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from difffit.archives import (  # noqa: F401 - re-exported: the intake's public names
    IMAGE_SUFFIXES,
    MAX_COMPRESSION_RATIO,
    check_public_host,
    class_files,
    class_folders,
    extract,
)
from difffit.errors import InvalidDataset
from difffit.settings import Settings

MAX_REDIRECTS = 5
Image.MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: PIL raises above 2x this
DECODE_CHUNK = 256  # images decoded at a time by load_image_folders


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


def load_image(path: Path | str, channels: int, size: int) -> np.ndarray:
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


@dataclass
class ImageFolders:
    """A class-folder data set whose layout is checked but whose images are not decoded yet.

    files[i] (a path relative to root: a short string per file, the only
    per-file state intake keeps) is an image of class labels[i] (the folder's
    index in class_names).
    """

    root: Path
    files: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.files)


def scan_image_folders(root: Path) -> ImageFolders:
    """List the class folders under `root` and their files; InvalidDataset for a bad layout."""
    folders = class_folders(root)
    if not folders:
        raise InvalidDataset("dataset has no class folders: expected one folder per class with images in it")
    if len(folders) < 2:
        raise InvalidDataset(f"dataset has only one class folder ({folders[0].name!r}); need at least 2")
    files, counts = [], []
    for folder in folders:
        found = _file_names(folder, root)
        files.extend(found)
        counts.append(len(found))
    labels = np.repeat(np.arange(len(folders), dtype=np.int64), counts)
    return ImageFolders(root, files, labels, [f.name for f in folders])


def _file_names(folder: Path, root: Path) -> list[str]:
    """:func:`class_files` of `folder` as paths relative to `root`, in the same order, without pathlib.

    pathlib interns every path component (Python 3.11), and the interned
    table never shrinks: per-file Path objects would make a worker's memory
    grow with every data set's file count.
    """
    top = str(folder)
    prefix = os.path.relpath(top, str(root))
    names = []
    for dirpath, _, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in filenames:
            if not name.startswith(".") and os.path.isfile(os.path.join(dirpath, name)):
                names.append(name if rel == "." else f"{rel}/{name}")
    names.sort(key=lambda n: n.split("/"))  # pathlib's order: component by component
    return [f"{prefix}/{n}" for n in names]


def decode_chunks(
    images: ImageFolders, channels: int, size: int, chunk: int, max_bad_listed: int = 5
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode `images` in order, `chunk` at a time: (pixels [k, C, size, size] in [-1, 1], labels [k]).

    Only one chunk's pixels are alive at a time (the caller consumes each
    before the next is decoded). Unreadable files are skipped and counted;
    after the last chunk the whole set is judged, as one InvalidDataset that
    lists the bad files, or says the set has zero images or which class
    folders have none. So nothing a consumer built from the chunks may be
    used before the iterator is exhausted.
    """
    bad: list[str] = []
    found = np.zeros(len(images.class_names), dtype=np.int64)
    for start in range(0, len(images), chunk):
        paths = images.files[start : start + chunk]
        labels = images.labels[start : start + chunk]
        pixels = np.empty((len(paths), channels, size, size), dtype=np.float32)
        keep = np.zeros(len(paths), dtype=bool)
        for i, name in enumerate(paths):
            path = os.path.join(images.root, name)
            try:
                pixels[i] = load_image(path, channels, size)
                keep[i] = True
            except Image.DecompressionBombError as exc:
                # PIL refuses before decoding: the declared size alone is over the limit.
                bad.append(f"{name} (decompression bomb: {exc})")
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                suffix = os.path.splitext(name)[1].lower()
                kind = "not an image" if suffix not in IMAGE_SUFFIXES else "corrupt image"
                bad.append(f"{name} ({kind}: {type(exc).__name__})")
        found += np.bincount(labels[keep], minlength=len(found))
        if keep.any():
            yield (pixels, labels) if keep.all() else (pixels[keep], labels[keep])
    if bad:
        listed = "; ".join(bad[:max_bad_listed])
        more = f" and {len(bad) - max_bad_listed} more" if len(bad) > max_bad_listed else ""
        raise InvalidDataset(f"{len(bad)} files could not be read as images: {listed}{more}")
    if not found.sum():
        raise InvalidDataset("dataset has zero images")
    empty = [name for name, n in zip(images.class_names, found, strict=True) if n == 0]
    if empty:
        raise InvalidDataset(f"class folders with no images: {', '.join(empty)}")


def load_image_folders(root: Path, channels: int, size: int, max_bad_listed: int = 5) -> ImageSet:
    """Read class folders under `root` into one :class:`ImageSet` (small sets; jobs use the chunks)."""
    images = scan_image_folders(root)
    pixels = np.empty((len(images), channels, size, size), dtype=np.float32)
    labels = np.empty(len(images), dtype=np.int64)
    n = 0
    for chunk, chunk_labels in decode_chunks(images, channels, size, DECODE_CHUNK, max_bad_listed):
        pixels[n : n + len(chunk)], labels[n : n + len(chunk)] = chunk, chunk_labels
        n += len(chunk)
    return ImageSet(pixels[:n], labels[:n], images.class_names)


@contextlib.contextmanager
def unpacked(data: bytes | Path, settings: Settings) -> Iterator[Path]:
    """The archive unpacked (within the caps) into a temporary folder, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="difffit-ds-") as tmp:
        extract(data, Path(tmp), settings)
        yield Path(tmp)


def load_archive(data: bytes | Path, settings: Settings, channels: int, size: int) -> ImageSet:
    """Unpack (within the caps) and decode an archive given as bytes or as a file path."""
    with unpacked(data, settings) as root:
        return load_image_folders(root, channels, size)


def load_dataset(url: str, settings: Settings, channels: int, size: int) -> ImageSet:
    """Fetch, unpack and decode a dataset URL (the whole intake, for the finetune task)."""
    return load_archive(fetch(url, settings), settings, channels, size)
