"""The Dockerfile, parsed as text: targets, torch placement, users, healthchecks."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache

import pytest

from .conftest import REPO


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    @property
    def healthcheck(self) -> str | None:
        checks = self.args("HEALTHCHECK")
        return checks[-1] if checks and checks[-1].strip().upper() != "NONE" else None


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not buf):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


@lru_cache(maxsize=1)
def stages() -> dict[str, Stage]:
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in _instructions((REPO / "Dockerfile").read_text()):
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, args
            parent, name = m.group(1), m.group(2) or f"stage{len(result)}"
            current = result[name] = Stage(name, parent)
        elif current is not None:
            current.instructions.append((keyword, args))
    return result


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    chain = []
    stage: Stage | None = stages()[name]
    while stage is not None:
        chain.insert(0, stage)
        stage = stages().get(stage.parent)
    return chain


def _runs(name: str) -> list[str]:
    return [run for stage in lineage(name) for run in stage.args("RUN")]


def test_targets_exist() -> None:
    assert {"api", "worker"} <= set(stages())


def test_api_installs_no_torch() -> None:
    assert not [run for run in _runs("api") if "torch" in run.lower()]
    assert any(re.search(r"pip install\s+\.(\s|$)", run) for run in _runs("api"))


def test_worker_installs_cuda_torch_and_diffusers() -> None:
    runs = _runs("worker")
    torch = [r for r in runs if re.search(r"\btorch==2\.13\.0\b", r)]
    assert torch, "the worker must pin torch==2.13.0"
    assert any(
        re.search(r"--(extra-)?index-url\s+https://download\.pytorch\.org/whl/cu\d+", r) for r in torch
    )
    # diffusers comes with the project's worker extra, installed after torch.
    assert any(re.search(r"pip install\s+['\"]?\.\[worker\]", r) for r in runs)
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    assert any(dep.startswith("diffusers") for dep in extra)
    assert any(dep == "torch==2.13.0" for dep in extra)


@pytest.mark.parametrize("target", ["api", "worker"])
def test_runs_as_non_root(target: str) -> None:
    instructions = [i for stage in lineage(target) for i in stage.instructions]
    cmd_at = max(i for i, (kw, _) in enumerate(instructions) if kw in ("CMD", "ENTRYPOINT"))
    users = [arg for kw, arg in instructions[:cmd_at] if kw == "USER"]
    assert users, f"{target}: no USER before CMD"
    assert users[-1].split(":")[0] not in ("root", "0")
    # and no later USER switches back
    assert all(arg.split(":")[0] not in ("root", "0") for kw, arg in instructions[cmd_at:] if kw == "USER")


@pytest.mark.parametrize("target", ["api", "worker"])
def test_healthchecks(target: str) -> None:
    check = stages()[target].healthcheck
    assert check and "CMD" in check


def test_api_healthcheck_hits_healthz_on_the_served_port() -> None:
    api = stages()["api"]
    assert "/healthz" in api.healthcheck
    assert "8000" in api.args("EXPOSE")[0] and "--port" in api.args("CMD")[-1]


def test_worker_runs_the_entrypoint_on_the_configured_queues() -> None:
    worker = stages()["worker"]
    assert '"difffit-worker"' in worker.args("CMD")[-1]
    assert any(
        "deploy/worker-entrypoint.sh" in arg and arg.endswith("/usr/local/bin/difffit-worker")
        for arg in worker.args("COPY")
    )
    script = (REPO / "deploy" / "worker-entrypoint.sh").read_text()
    assert "exec celery -A worker.celery_app worker" in script
    assert "${DIFFFIT_QUEUES:-generate,finetune}" in script
    # The healthcheck pings the node name the entrypoint gives the worker.
    assert '"celery@$HOSTNAME"' in worker.healthcheck and '"celery@${HOSTNAME:-' in script
    # The lock folder exists in the image, owned by the worker's user, so a
    # fresh named volume mounted there inherits that ownership.
    assert any("/gpu-locks" in run and "chown difffit" in run for run in worker.args("RUN"))


def test_cli_works_in_the_api_image() -> None:
    # `difffit` (db upgrade in compose's migrate service, tenant create) builds
    # its parser from core.shapes; the api image must contain launch/, core/ and adapters_store/.
    copied = " ".join(arg for stage in lineage("api") for arg in stage.args("COPY"))
    for package in ("launch", "core", "adapters_store"):
        assert re.search(rf"\b{package}\b", copied), package
    shapes = (REPO / "core" / "shapes.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+torch", shapes, re.MULTILINE)


def test_worker_image_holds_the_torch_core_and_the_celery_worker() -> None:
    copied = " ".join(arg for stage in lineage("worker") for arg in stage.args("COPY"))
    for package in ("difffit", "core", "worker", "base_models", "adapters_store"):
        assert re.search(rf"\b{package} \./{package}\b", copied), package
