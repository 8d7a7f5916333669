"""Unpack a data set archive in a child process: ``python -m worker.unpack ARCHIVE DEST``.

The caps come as the JSON of the relevant settings on stdin. The outcome is
one JSON line on stdout: ``{}``, or the error's ``{"code", "message"}``.
A worker's intake runs this instead of :func:`difffit.archives.extract`
in-process: reading an archive holds its whole directory (some 600 bytes
per file for a zip), which would make the worker's memory grow with the
number of files; this process ends as soon as the files are on disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CAPS = ("dataset_max_files", "dataset_max_unpacked_bytes", "dataset_max_bytes")


def main(argv: list[str]) -> int:
    from difffit.archives import extract
    from difffit.errors import DiffFitError
    from difffit.settings import Settings

    archive, dest = Path(argv[0]), Path(argv[1])
    try:
        extract(archive, dest, Settings(**json.loads(sys.stdin.read())))
    except DiffFitError as exc:
        print(json.dumps(exc.to_dict()))
        return 1
    except MemoryError:
        print(json.dumps({"code": "out-of-memory", "message": "out of host memory while unpacking"}))
        return 1
    print("{}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
