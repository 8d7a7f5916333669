"""Alembic migrations of the registry: they build exactly models.py's schema.

Each case runs on a fresh SQLite file and on a fresh PostgreSQL database
(skipped with a reason when the local server does not answer).
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, text

from adapters_store import Registry
from adapters_store.db import (
    INITIAL_REVISION,
    INITIAL_TABLES,
    MIGRATIONS_DIR,
    alembic_config,
    database_revision,
    head_revision,
    upgrade_schema,
)
from adapters_store.models import Base
from difffit.errors import BackendUnavailable

from .conftest import REPO


def _engine(url: str) -> Engine:
    return create_engine(url)


def _schema(engine: Engine) -> dict[str, dict[str, object]]:
    """Tables -> columns (name, nullable), indexes, uniques, foreign keys, as reflected."""
    insp = inspect(engine)
    out: dict[str, dict[str, object]] = {}
    for table in insp.get_table_names():
        out[table] = {
            "columns": {c["name"]: c["nullable"] for c in insp.get_columns(table)},
            "pk": tuple(insp.get_pk_constraint(table)["constrained_columns"]),
            "indexes": {
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table)
            },
            "uniques": {tuple(u["column_names"]) for u in insp.get_unique_constraints(table)},
            "fks": {
                (
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    (f.get("options") or {}).get("ondelete"),
                )
                for f in insp.get_foreign_keys(table)
            },
        }
    return out


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_upgrade_head_builds_the_models_schema(database_url: str) -> None:
    upgrade_schema(database_url)
    migrated = _engine(database_url)
    try:
        schema = _schema(migrated)
        assert set(schema) == set(Base.metadata.tables) | {"alembic_version"}
        for name, table in Base.metadata.tables.items():
            got = schema[name]
            assert got["columns"] == {c.name: c.nullable for c in table.columns}, name
            assert got["pk"] == tuple(c.name for c in table.primary_key.columns), name
            assert {(i[0], i[1]) for i in got["indexes"]} >= {
                (i.name, tuple(c.name for c in i.columns)) for i in table.indexes
            }, name
            assert {(fk[0], fk[1]) for fk in got["fks"]} == {
                (tuple(fk.parent.name for fk in c.elements), c.referred_table.name)
                for c in table.foreign_key_constraints
            }, name
        # `alembic check`: autogenerate finds nothing left to migrate.
        assert _diff(migrated) == []
    finally:
        migrated.dispose()
    assert database_revision(database_url) == head_revision()


def test_migrations_and_create_all_build_the_same_schema(database_url: str, tmp_path: Path) -> None:
    # The legacy path (create_all) and the migration path must agree, or
    # stamping a create_all database at 0001 would be a lie.
    upgrade_schema(database_url)
    migrated = _engine(database_url)
    reference = _engine(f"sqlite:///{tmp_path / 'create_all.db'}")
    try:
        Base.metadata.create_all(reference)
        got, want = _schema(migrated), _schema(reference)
        got.pop("alembic_version")
        assert {t: s["columns"] for t, s in got.items()} == {t: s["columns"] for t, s in want.items()}
        if migrated.dialect.name == "sqlite":
            assert got == want
    finally:
        migrated.dispose()
        reference.dispose()


def test_upgrade_twice_is_a_noop(database_url: str) -> None:
    reg = Registry(database_url)
    try:
        assert reg.create_schema() == head_revision()
        reg.create_tenant("acme")
        upgrade_schema(database_url)
        assert reg.create_schema() == head_revision()
        assert reg.get_tenant("acme").name == "acme"
        with reg._db.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                head_revision()
            ]
    finally:
        reg.close()


def _legacy_create_all_database(database_url: str) -> None:
    """What create_schema's create_all built before migrations: the 0001 schema (the
    models have grown since), without an alembic_version table."""
    from alembic import command

    legacy = _engine(database_url)
    try:
        with legacy.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, INITIAL_REVISION)
            conn.execute(text("DROP TABLE alembic_version"))
            # A tenant written by that release (today's models have more columns).
            conn.execute(
                text("INSERT INTO tenants (name, created_at, disabled) VALUES ('old', :now, :no)"),
                {"now": "2025-01-01 00:00:00", "no": False},
            )
    finally:
        legacy.dispose()


def test_create_all_database_is_stamped_then_upgraded(database_url: str) -> None:
    _legacy_create_all_database(database_url)
    reg = Registry(database_url)
    try:
        assert reg.schema_revision() is None
        assert reg.create_schema() == head_revision()
        assert reg.schema_revision() == head_revision()
        assert reg.get_tenant("old").name == "old"
        reg.create_tenant("new")
    finally:
        reg.close()


def test_partial_schema_is_refused(database_url: str) -> None:
    engine = _engine(database_url)
    Base.metadata.tables["tenants"].create(engine)
    engine.dispose()
    with pytest.raises(BackendUnavailable, match="only some registry tables"):
        upgrade_schema(database_url)


def test_unknown_revision_is_refused(database_url: str) -> None:
    upgrade_schema(database_url)
    engine = _engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    engine.dispose()
    with pytest.raises(BackendUnavailable, match="does not know"):
        Registry(database_url).create_schema()


def _upgrade_concurrently(database_url: str, n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade_schema(database_url)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_concurrent_upgrades_serialize(database_url: str) -> None:
    # N workers starting at once all migrate; they must queue, not race.
    assert _upgrade_concurrently(database_url, 3) == []
    assert database_revision(database_url) == head_revision()


def test_concurrent_first_opens_of_a_new_sqlite_file(tmp_path: Path) -> None:
    # A new file is switched to WAL by whichever connection comes first; SQLite
    # answers the others "database is locked" without waiting (CI saw it once in
    # ~400 runs of the test above), so the switch is retried. Before the retry,
    # 7 of 100 rounds of 4 openers failed here.
    for i in range(20):
        url = f"sqlite:///{tmp_path}/registry{i}.db"
        assert _upgrade_concurrently(url, 6) == [], f"round {i}"
        assert database_revision(url) == head_revision()


def test_in_memory_registry_migrates_on_its_own_connection() -> None:
    reg = Registry("sqlite://")
    assert reg.create_schema() == head_revision()
    assert reg.create_tenant("acme").name == "acme"


def test_migration_chain_starts_at_the_initial_revision_without_branches() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    base = list(script.walk_revisions())[-1]
    assert base.revision == INITIAL_REVISION and base.down_revision is None
    assert set(Base.metadata.tables) == INITIAL_TABLES or head_revision() != INITIAL_REVISION


def test_alembic_ini_points_at_the_package_migrations() -> None:
    ini = configparser.ConfigParser()
    ini.read(REPO / "alembic.ini")
    location = ini.get("alembic", "script_location", raw=True).replace("%(here)s", str(REPO))
    assert Path(location).resolve() == MIGRATIONS_DIR


def test_migrations_ship_as_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["adapters_store"]
    pkg = MIGRATIONS_DIR.parent
    shipped = {p for pattern in patterns for p in pkg.glob(pattern)}
    needed = {MIGRATIONS_DIR / "env.py", MIGRATIONS_DIR / "script.py.mako"}
    needed |= set((MIGRATIONS_DIR / "versions").glob("*.py"))
    assert needed <= shipped


def test_alembic_command_line_reads_difffit_database_url(tmp_path: Path) -> None:
    # `alembic -c alembic.ini upgrade head` from another folder, URL from the env.
    db = tmp_path / "cli.db"
    env = {**os.environ, "DIFFFIT_DATABASE_URL": f"sqlite:///{db}", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert database_revision(f"sqlite:///{db}") == head_revision()


def test_difffit_db_upgrade_prints_the_revision_without_torch(tmp_path: Path) -> None:
    # compose's migrate service runs this in the api image, which has no torch.
    code = (
        "import sys; from launch.cli import main; rc = main(['db', 'upgrade']); "
        "assert 'torch' not in sys.modules, 'db upgrade imported torch'; sys.exit(rc)"
    )
    env = {**os.environ, "DIFFFIT_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert f"at revision {head_revision()}" in proc.stdout


def test_0002_backfills_last_version_so_numbers_continue(database_url: str) -> None:
    # A registry at 0001 with versions 1..3 of one adapter: after the upgrade the
    # next version is 4, and deleting the newest one does not free its number.
    from alembic import command

    command.upgrade(alembic_config(database_url), INITIAL_REVISION)
    engine = _engine(database_url)
    at = {"t": "2026-01-01 00:00:00"}
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (id, name, created_at, disabled) VALUES (1, 'a', :t, false)"), at
        )
        conn.execute(
            text("INSERT INTO adapters (id, tenant_id, name, created_at) VALUES (7, 1, 'fungi', :t)"), at
        )
        for v in (1, 2, 3):
            conn.execute(
                text(
                    "INSERT INTO adapter_versions (adapter_id, version, sha256, size_bytes, method, "
                    "base_model_hash, class_names, resolution, trainable_params, metadata, files, "
                    "created_at) VALUES (7, :v, :sha, 1, 'difffit', 'b', '[\"a\"]', 32, 1, '{}', '{}', :t)"
                ),
                {"v": v, "sha": f"{v:064x}", **at},
            )
    engine.dispose()
    reg = Registry(database_url)
    try:
        assert reg.create_schema() == head_revision()
        tenant_id = reg.get_tenant("a").id
        reg.delete_version(tenant_id, "fungi", 3)
        new = reg.add_version(
            tenant_id, "fungi", sha256="e" * 64, size_bytes=1, method="difffit", base_model_hash="b",
            class_names=["a"], resolution=32, trainable_params=1, metadata={},
        )  # fmt: skip
        assert new.version == 4
    finally:
        reg.close()
