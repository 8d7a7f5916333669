"""Validate an uploaded data set archive before anything is stored.

The same unpacking rules as a job's intake (:func:`difffit.archives.extract`:
file count, unpacked bytes, compression ratio, safe member paths, no links)
and the same layout (one folder per class, at least two, none empty). Each
file is opened with Pillow, which reads only its header: a file that is not
an image is refused here, by name, instead of failing the job minutes later.
Full decoding stays with the worker, which owns the CPU time for it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from difffit.archives import class_files, class_folders, extract
from difffit.errors import InvalidDataset
from difffit.settings import Settings

MAX_BAD_LISTED = 5


@dataclass
class ArchiveSummary:
    """What an archive holds: class names (sorted folder names) and images per class."""

    class_names: list[str]
    class_counts: list[int]

    @property
    def images(self) -> int:
        return sum(self.class_counts)


def _is_image(path: Path) -> str | None:
    """None when Pillow recognises the file as an image, else why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed by open(); size proves it
        return None
    except Image.DecompressionBombError:
        return "decompression bomb"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not an image: {type(exc).__name__}"


def inspect_archive(path: Path, settings: Settings, scratch: Path | None = None) -> ArchiveSummary:
    """Unpack `path` into a scratch folder (removed after) and check its layout and files.

    Raises InvalidDataset saying what is wrong.
    """
    with tempfile.TemporaryDirectory(prefix="difffit-upload-", dir=scratch) as tmp:
        root = Path(tmp)
        extract(path, root, settings)
        folders = class_folders(root)
        if not folders:
            raise InvalidDataset(
                "dataset has no class folders: expected one folder per class with images in it"
            )
        if len(folders) < 2:
            raise InvalidDataset(f"dataset has only one class folder ({folders[0].name!r}); need at least 2")
        if len(folders) > settings.max_classes:
            raise InvalidDataset(f"{len(folders)} classes; at most {settings.max_classes} allowed")
        counts, bad, empty = [], [], []
        for folder in folders:
            found = 0
            for file in class_files(folder):
                why = _is_image(file)
                if why is None:
                    found += 1
                else:
                    bad.append(f"{file.relative_to(root)} ({why})")
            counts.append(found)
            if found == 0:
                empty.append(folder.name)
        if bad:
            listed = "; ".join(bad[:MAX_BAD_LISTED])
            more = f" and {len(bad) - MAX_BAD_LISTED} more" if len(bad) > MAX_BAD_LISTED else ""
            raise InvalidDataset(f"{len(bad)} files could not be read as images: {listed}{more}")
        if empty:
            raise InvalidDataset(f"class folders with no images: {', '.join(empty)}")
        return ArchiveSummary([f.name for f in folders], counts)
