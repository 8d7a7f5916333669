"""Fixtures of the deployment tests: repo paths and throw-away databases.

PostgreSQL cases create a fresh database per test on the server named by
DIFFFIT_TEST_POSTGRES_URL (default: local trust auth, as in
tests/adapters_store) and are skipped with that reason when none answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pg import PG_UNREACHABLE, pg_connect, throwaway_database

REPO = Path(__file__).resolve().parents[2]
PG_SKIP = f"{PG_UNREACHABLE}: migration cases run on SQLite only"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    """An autocommit connection to the server's maintenance database."""
    import psycopg2

    try:
        conn = pg_connect()
    except psycopg2.OperationalError:
        pytest.skip(PG_SKIP)
    yield conn
    conn.close()


@pytest.fixture
def postgres_url(pg_admin: Any) -> Iterator[str]:
    """URL of an empty PostgreSQL database, dropped after the test."""
    with throwaway_database("difffit_deploy", admin=pg_admin) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file in tmp_path, and a fresh PostgreSQL one."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'registry.db'}"
