"""The layout's rules, checked on the source (see the README's "What is where").

- ``difffit/`` is the torch-free ground floor: it imports nothing of the project above it.
- ``worker/`` is Celery plumbing and job handling: no ``nn.Module`` is defined there.
- The adapter file is read by the safetensors library only: no hand-written header parsing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE_THE_GROUND_FLOOR = ("launch", "worker", "core", "adapters_store", "service", "bench", "base_models")


def _sources(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def _imports(tree: ast.AST) -> list[str]:
    """Top-level package of every import in `tree`, including relative ones resolved to '.'."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append("." if node.level else (node.module or "").split(".")[0])
    return out


def test_the_ground_floor_imports_nothing_above_it() -> None:
    bad = {}
    for path in _sources("difffit"):
        above = [m for m in _imports(ast.parse(path.read_text())) if m in ABOVE_THE_GROUND_FLOOR]
        if above:
            bad[str(path.relative_to(REPO))] = above
    assert not bad, f"difffit/ must not import {ABOVE_THE_GROUND_FLOOR}: {bad}"


# Benchmarks whose subject is the worker itself (its intake, its task threads): they drive
# worker/ the way a job does. Every other benchmark measures the core.
WORKER_BENCHES = {"bench/bench_intake.py", "bench/bench_fairness.py"}


def test_bench_and_base_models_use_the_core_not_the_worker() -> None:
    bad = {}
    for folder in ("bench", "base_models"):
        for path in _sources(folder):
            if str(path.relative_to(REPO)) in WORKER_BENCHES:
                continue
            if "worker" in _imports(ast.parse(path.read_text())):
                bad.setdefault(folder, []).append(str(path.relative_to(REPO)))
    assert not bad, f"import the torch core (core/), not the serving worker: {bad}"


def _torch_classes(tree: ast.AST) -> list[str]:
    """Classes deriving from anything of torch (nn.Module, torch.nn.Linear, a name imported from torch)."""
    from_torch = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "diffusers"):
            from_torch |= {alias.asname or alias.name for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                text = ast.unparse(base)
                if text.split(".")[0] in from_torch | {"torch"} or text.startswith("nn."):
                    found.append(f"{node.name}({text})")
    return found


def test_no_file_under_worker_defines_an_nn_module() -> None:
    bad = {}
    for path in _sources("worker"):
        classes = _torch_classes(ast.parse(path.read_text()))
        if classes:
            bad[str(path.relative_to(REPO))] = classes
    assert not bad, f"torch modules belong in core/: {bad}"
    # The scan itself finds modules where they are.
    layers = ast.parse((REPO / "core/adapter/layers.py").read_text())
    assert "AdaptedLinear(nn.Module)" in _torch_classes(layers)


# What a hand-written safetensors reader has to spell: the header length as a little-endian
# u64, the per-tensor byte ranges and the metadata key of the JSON header.
TELLTALES = {"<Q", "data_offsets", "__metadata__"}


def _after_the_library_checked(tree: ast.AST) -> set[ast.AST]:
    """Nodes inside functions that first hand the bytes to safetensors' ``deserialize``.

    That call checks the whole container (header length, JSON, offsets); reading the
    metadata, which it does not return, from bytes it accepted is not a reader of its own.
    """
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and any(
            isinstance(n, ast.Call) and ast.unparse(n.func) == "deserialize" for n in ast.walk(fn)
        ):
            inside.update(
                n for n in ast.walk(fn) if not (isinstance(n, ast.Constant) and n.value != "__metadata__")
            )
    return inside


def _hand_parsing(tree: ast.AST) -> list[str]:
    found = []
    checked = _after_the_library_checked(tree)
    for node in ast.walk(tree):
        if node in checked:
            continue
        if isinstance(node, ast.Constant) and node.value in TELLTALES:
            found.append(repr(node.value))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_bytes"
            and any(isinstance(a, ast.Constant) and a.value == "little" for a in node.args)
        ):
            found.append("int.from_bytes(..., 'little')")
    return found


def test_no_hand_written_safetensors_parsing_outside_tests() -> None:
    bad = {}
    for folder in ("difffit", *ABOVE_THE_GROUND_FLOOR):
        for path in _sources(folder):
            found = _hand_parsing(ast.parse(path.read_text()))
            if found:
                bad[str(path.relative_to(REPO))] = found
    assert not bad, f"read adapter files with safetensors (difffit.adapter_format): {bad}"


@pytest.mark.parametrize(
    "snippet",
    [
        "(n,) = struct.unpack('<Q', data[:8])",
        "n = int.from_bytes(data[:8], 'little')",
        "spans = [t['data_offsets'] for t in header.values()]",
        "meta = header.pop('__metadata__', {})",
    ],
)
def test_the_parsing_scan_catches_a_hand_written_reader(snippet: str) -> None:
    assert _hand_parsing(ast.parse(snippet))
