"""A fine-tune's bounded intake: archive -> decoded chunks -> encoded chunks -> host latents.

The archive is unpacked to disk by a child process (worker.unpack: reading
an archive's directory costs memory per file, which stays out of the
worker). The task thread decodes ``DIFFFIT_INTAKE_CHUNK`` images at a time; each
chunk is encoded by its own engine call (the VAE's posterior mean, or the
pixels themselves on a pixel-space base), so sampling steps run between
chunks, and comes back to the host in the base's dtype. The training set
lives on the host: in RAM when small, else in a ``.npy`` file under
``data_dir/intake`` (above ``DIFFFIT_INTAKE_MEMMAP_MB``), written with
plain file writes (which never count towards the process's resident set)
and memory-mapped read-only for training, which moves only each drawn
batch to the device. Intake's peak host memory so grows with the chunk,
not with the data set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from difffit.errors import DiffFitError, error_from_code
from difffit.settings import REPO_ROOT, Settings
from worker import unpack
from worker.datasets import ImageSet, decode_chunks, fetch, scan_image_folders
from worker.faults import job_fault

VAE_BATCH = 64  # rows per VAE forward inside one chunk
INTAKE_DIR = "intake"
ENCODE_ADVICE = "lower DIFFFIT_INTAKE_CHUNK (images encoded at a time) or the job's resolution"
DECODE_ADVICE = "lower DIFFFIT_INTAKE_CHUNK (images decoded at a time) or the job's resolution"


@dataclasses.dataclass
class EncodedSet:
    """A job's training set on the host: x [N, C, h, w] in the base's dtype, labels [N] (numpy)."""

    x: torch.Tensor
    labels: np.ndarray
    class_names: list[str]


def intake_file(settings: Settings, job_id: str) -> Path:
    """Where a large training set of `job_id` is kept while the job runs."""
    return settings.data_dir / INTAKE_DIR / f"{job_id}.npy"


def encode_pixels(base, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Engine thread: pixels [k, C, H, W] in [-1, 1] -> host latents [k, ...] in the base's dtype."""
    x = torch.as_tensor(pixels).to(base.transformer.device)
    latents = torch.cat([base.encode(part) for part in x.split(VAE_BATCH)])
    return latents.to(base.transformer.dtype).cpu()


class HostRows:
    """Rows appended chunk by chunk: a preallocated tensor, or a .npy file once they are large.

    The file is written with ``write()`` (page cache, not this process's
    memory) and mapped copy-on-write at the end, so nothing is ever written
    through the mapping and reading it back faults in only the rows drawn.
    """

    def __init__(self, rows: int, memmap_bytes: int, path: Path):
        self.rows, self.memmap_bytes, self.path = rows, memmap_bytes, path
        self.written = 0
        self._ram: torch.Tensor | None = None
        self._file = None
        self._shape: tuple[int, ...] = ()
        self._dtype: torch.dtype | None = None

    def append(self, chunk: torch.Tensor) -> None:
        if self._dtype is None:
            self._open(chunk)
        if self._file is not None:
            self._file.write(memoryview(np.ascontiguousarray(_as_numpy(chunk))))
        else:
            self._ram[self.written : self.written + len(chunk)] = chunk
        self.written += len(chunk)

    def _open(self, chunk: torch.Tensor) -> None:
        self._shape, self._dtype = (self.rows, *chunk.shape[1:]), chunk.dtype
        if math.prod(self._shape) * chunk.element_size() <= self.memmap_bytes:
            self._ram = torch.empty(self._shape, dtype=chunk.dtype)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()/close()
        header = {"descr": np.lib.format.dtype_to_descr(_as_numpy(chunk).dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self._file, {**header, "shape": self._shape})

    def finish(self) -> torch.Tensor:
        """The rows, once all were appended: [rows, ...] in the chunks' dtype."""
        if self.written != self.rows:
            raise RuntimeError(f"intake wrote {self.written} rows of {self.rows}")
        if self._file is None:
            return self._ram
        self._file.close()
        self._file = None
        # Copy-on-write: torch wants a writable array; nothing writes to it.
        rows = torch.from_numpy(np.load(self.path, mmap_mode="c"))
        return rows.view(torch.bfloat16) if self._dtype == torch.bfloat16 else rows

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: its bits travel as uint16 and are viewed back in finish().
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def encode_folders(rt, root: Path, channels: int, size: int, path: Path) -> EncodedSet:
    """Decode and encode the class folders under `root` chunk by chunk into host rows."""
    settings = rt.settings
    images = scan_image_folders(root)
    rows = HostRows(len(images), settings.intake_memmap_mb * 1024**2, path)
    labels = np.empty(len(images), dtype=np.int64)
    try:
        chunks = decode_chunks(images, channels, size, settings.intake_chunk)
        while True:
            with job_fault("decoding the data set", DECODE_ADVICE):
                item = next(chunks, None)
            if item is None:
                break
            pixels, chunk_labels = item
            labels[rows.written : rows.written + len(chunk_labels)] = chunk_labels
            with job_fault("encoding the data set", ENCODE_ADVICE):
                rows.append(rt.call(lambda pixels=pixels: encode_pixels(rt.base, pixels)))
            del pixels, item
        return EncodedSet(rows.finish(), labels, images.class_names)
    finally:
        rows.close()


def intake(rt, source: bytes | Path | str, channels: int, size: int, path: Path) -> EncodedSet:
    """The whole intake of an archive (bytes or a file) or a dataset URL (str)."""
    if isinstance(source, str):
        with job_fault("downloading the data set", "lower DIFFFIT_DATASET_MAX_BYTES"):
            source = fetch(source, rt.settings)
    with tempfile.TemporaryDirectory(prefix="difffit-ds-") as tmp:
        root = Path(tmp) / "files"
        if isinstance(source, bytes):
            archive = Path(tmp) / "archive"
            archive.write_bytes(source)
            source = archive  # the downloaded bytes are not needed past here
        unpack_in_child(source, root, rt.settings)
        return encode_folders(rt, root, channels, size, path)


def unpack_in_child(archive: Path, dest: Path, settings: Settings) -> None:
    """:func:`extract` in a short-lived child process (worker.unpack): same caps, same errors."""
    caps = {name: getattr(settings, name) for name in unpack.CAPS}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.unpack", str(archive), str(dest)],
        input=json.dumps(caps),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    outcome = json.loads(lines[-1]) if lines else {}
    if proc.returncode == 0 and not outcome:
        return
    if outcome.get("code"):
        raise error_from_code(outcome["code"], outcome["message"])
    raise DiffFitError(f"unpacking the data set failed (exit {proc.returncode}): {proc.stderr[-500:]}")


def encode_image_set(rt, images: ImageSet) -> EncodedSet:
    """Engine thread, one call: a decoded :class:`ImageSet` to host rows (small sets, tests)."""
    return EncodedSet(encode_pixels(rt.base, images.pixels), images.labels, images.class_names)
