"""Throw-away PostgreSQL databases for tests, on the server of DIFFFIT_TEST_POSTGRES_URL.

Default: the local server with trust auth. Callers skip (or fall back to
SQLite) with PG_UNREACHABLE when no server answers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import URL, make_url

PG_ADMIN_URL = os.environ.get(
    "DIFFFIT_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
PG_UNREACHABLE = "PostgreSQL not reachable at 127.0.0.1:5432"


def pg_connect(url: URL | None = None) -> Any:
    """An autocommit psycopg2 connection (raises psycopg2.OperationalError when unreachable)."""
    import psycopg2

    url = url or make_url(PG_ADMIN_URL)
    conn = psycopg2.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password,
        dbname=url.database or "postgres",
        connect_timeout=3,
    )
    conn.autocommit = True
    return conn


def pg_reachable() -> bool:
    """Whether the test server answers."""
    import psycopg2

    try:
        pg_connect().close()
        return True
    except psycopg2.OperationalError:
        return False


@contextlib.contextmanager
def throwaway_database(prefix: str, admin: Any | None = None) -> Iterator[str]:
    """Create an empty database, yield its SQLAlchemy URL, drop it (closing its sessions)."""
    conn = admin or pg_connect()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        if admin is None:
            conn.close()
