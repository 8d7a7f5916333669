"""base_models/train_broad_gpu.sh, dry run on the CPU: prepare, run, then unpack what $OUT would return.

The same script a GPU session runs, with a tiny model, a tiny corpus and no wheel (diffusers is
installed here), so it takes seconds; it checks the logic (packing, the device run's files, the
pieces reassembling into a folder the gate wrote into), not the recipe's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from diffusers import DiTTransformer2DModel

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "base_models" / "train_broad_gpu.sh"


def _sh(step: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), step],
        cwd=REPO,
        env={**os.environ, "PY": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_prepare_then_run_packs_a_gated_export(corpus: Path, tmp_path: Path) -> None:
    gpu, out = tmp_path / "gpu", tmp_path / "out"
    prep = _sh("prepare", {"GPU_DIR": str(gpu), "CORPUS": str(corpus), "NO_WHEEL": "1"})
    assert prep.returncode == 0, prep.stderr
    assert sorted(p.name for p in (gpu / "corpus").iterdir()) == [
        "corpus.json",
        "heldout_images.npy.gz",
        "heldout_labels.npy.gz",
        "labels.json",
        "train_images.npy.gz",
        "train_labels.npy.gz",
    ]
    tiny = {"LAYERS": "1", "HEADS": "1", "HEAD_DIM": "8", "PATCH": "4", "BATCH": "8", "WARMUP": "1"}
    gate = {"GATE_PER_CLASS": "2", "GATE_STEPS": "2", "GATE_EPOCHS": "1"}
    env = {"GPU_DIR": str(gpu), "OUT": str(out), "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "BF16": ""}
    res = _sh("run", {**env, **tiny, **gate, "STEPS": "3", "MINUTES": "5", "THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = sorted(out.glob("broad-dit.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    assert "train exit 0" in (out / "summary.txt").read_text()
    assert "gate: class accuracy" in (out / "summary.txt").read_text()
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back" / "broad-dit"
    assert json.loads((back / "training.json").read_text())["steps_done"] == 3
    assert json.loads((back / "gate.json").read_text())["classes"] == 15
    assert (back / "gate_samples.png").is_file() and (tmp_path / "back" / "train.log").is_file()
    assert DiTTransformer2DModel.from_pretrained(back / "transformer").config.patch_size == 4
