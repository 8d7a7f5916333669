"""Every environment variable the code and the deployment files read is documented.

- each `Settings` field is a row of the README's Settings table
  (`| `DIFFFIT_<NAME>` | default | meaning |`), the documented defaults, and
  scalar defaults there match the code;
- each `DIFFFIT_*` name in the Python sources of difffit/, service/, worker/
  and adapters_store/ (os.environ / os.getenv / env dict lookups, messages)
  appears in the README;
- each `DIFFFIT_*` name in docker-compose.yml, the Dockerfile and the worker
  entrypoint appears in the README or deploy/env.example, and every variable compose interpolates is
  listed in deploy/env.example;
- deploy/env.example names no variable that nothing reads (typos).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from difffit.settings import Settings

from .conftest import REPO

NAME = re.compile(r"\bDIFFFIT_[A-Z][A-Z0-9_]*\b")
SOURCE_DIRS = ("difffit", "service", "worker", "adapters_store")
ROW = re.compile(r"^\|\s*`(DIFFFIT_[A-Z0-9_]+)`\s*\|\s*(.*?)\s*\|", re.MULTILINE)


def _readme() -> str:
    return (REPO / "README.md").read_text()


def _env_example_names() -> set[str]:
    """Variables set or shown (commented out) in deploy/env.example."""
    names = set()
    for line in (REPO / "deploy" / "env.example").read_text().splitlines():
        m = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
        if m:
            names.add(m.group(1))
    return names


def _settings_env_names() -> dict[str, str]:
    return {f"DIFFFIT_{name.upper()}": name for name in Settings.model_fields}


def _source_names() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for name in NAME.findall(path.read_text()):
                found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def _deploy_names() -> set[str]:
    files = ("docker-compose.yml", "Dockerfile", "deploy/worker-entrypoint.sh")
    text = "".join((REPO / f).read_text() for f in files)
    return set(NAME.findall(text))


def _compose_interpolated() -> set[str]:
    text = (REPO / "docker-compose.yml").read_text()
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))


def test_every_setting_is_a_row_of_the_readme_settings_table() -> None:
    rows = dict(ROW.findall(_readme()))
    missing = sorted(set(_settings_env_names()) - set(rows))
    assert not missing, f"Settings fields without a README Settings row: {missing}"


def _cell_value(cell: str) -> str | None:
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else None


@pytest.mark.parametrize("env_name", sorted(_settings_env_names()))
def test_documented_defaults_match_the_code(env_name: str) -> None:
    field = Settings.model_fields[_settings_env_names()[env_name]]
    cell = dict(ROW.findall(_readme())).get(env_name)
    if cell is None:
        pytest.fail(f"{env_name} is not in the README Settings table")
    default, shown = field.default, _cell_value(cell)
    if default is None:
        return  # derived or unset: the README says from what, in words
    if isinstance(default, bool):
        assert shown == str(default).lower(), f"{env_name}: code {default}, README {cell}"
    elif isinstance(default, int | float):
        assert shown is not None and float(shown) == float(default), (
            f"{env_name}: code {default}, README {cell}"
        )
    elif (
        isinstance(default, str) and shown is not None and not isinstance(default, Path) and "/" not in shown
    ):
        assert shown == default, f"{env_name}: code {default!r}, README {cell}"


def test_every_difffit_variable_in_the_sources_is_in_the_readme() -> None:
    readme = _readme()
    missing = {name: where for name, where in _source_names().items() if f"`{name}`" not in readme}
    assert not missing, f"DIFFFIT_* names used in code but not in README.md: {missing}"


def test_every_difffit_variable_of_the_deployment_is_documented() -> None:
    readme, example = _readme(), _env_example_names()
    missing = sorted(n for n in _deploy_names() if f"`{n}`" not in readme and n not in example)
    assert not missing, f"used in docker-compose.yml / Dockerfile but documented nowhere: {missing}"


def test_env_example_lists_every_compose_variable() -> None:
    missing = sorted(_compose_interpolated() - _env_example_names())
    assert not missing, f"docker-compose.yml reads these but deploy/env.example does not list them: {missing}"


def test_env_example_names_only_known_variables() -> None:
    known = set(_settings_env_names()) | _deploy_names() | _compose_interpolated()
    unknown = sorted(n for n in _env_example_names() if n not in known)
    assert not unknown, f"deploy/env.example sets variables nothing reads: {unknown}"
