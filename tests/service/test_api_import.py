"""The service must not import torch, diffusers or the worker package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_service_does_not_import_torch():
    code = (
        "import sys, service.main, service.queue, service.deps, launch.embedded\n"
        "service.main.create_app()\n"
        "bad = [m for m in ('torch', 'diffusers', 'worker', 'core') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIFFFIT_DATA_DIR": "/nonexistent-difffit"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
