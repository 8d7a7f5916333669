"""The API side (every module of service/ and adapters_store/) imports neither torch nor the core."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "diffusers", "core", "worker")


def _modules(package: str) -> list[str]:
    """Every module of `package` (adapters_store/migrations is Alembic's folder, not a package)."""
    path = REPO / package
    found = [package] + [m.name for m in pkgutil.walk_packages([str(path)], prefix=f"{package}.")]
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in path.rglob("*.py")
        if "migrations" not in p.parts
    }
    assert files <= set(found), f"modules the walk missed: {sorted(files - set(found))}"
    return sorted(found)


def _import_fresh(
    modules: list[str], forbidden: tuple[str, ...] = FORBIDDEN, then: str = ""
) -> subprocess.CompletedProcess:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"{then}"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIFFFIT_DATA_DIR": "/nonexistent-difffit"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_every_service_and_store_module_imports_without_torch_or_the_core():
    modules = _modules("service") + _modules("adapters_store")
    assert "service.routes.generate" in modules and "adapters_store.registry_jobs" in modules
    proc = _import_fresh(modules, then="import service.main\nservice.main.create_app()\n")
    assert proc.returncode == 0, proc.stderr


def test_the_launchers_the_api_image_runs_import_without_torch():
    # launch.cli runs in the api image (db upgrade, tenant create); launch.embedded starts the API.
    proc = _import_fresh(["launch.cli", "launch.embedded"])
    assert proc.returncode == 0, proc.stderr
    # The cli's shape list comes from core.shapes, the one core module the api image needs.
    proc = _import_fresh(["core.shapes"], forbidden=("torch", "diffusers"))
    assert proc.returncode == 0, proc.stderr
