"""Fixtures for the adapters_store tests: a registry on SQLite and PostgreSQL.

The PostgreSQL case creates a throw-away database once per session on the
server named by DIFFFIT_TEST_POSTGRES_URL (default: local trust auth) and
empties it before every test; it is skipped when no server answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from adapters_store import Registry
from tests.pg import PG_UNREACHABLE, pg_reachable, throwaway_database

PG_SKIP = f"{PG_UNREACHABLE}: registry cases run on SQLite only"
TABLES = (
    "webhook_deliveries",
    "datasets",
    "job_events",
    "jobs",
    "adapter_versions",
    "adapters",
    "api_keys",
    "tenants",
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database, dropped at the end of the session."""
    if not pg_reachable():
        pytest.skip(PG_SKIP)
    with throwaway_database("difffit_test") as url:
        yield url


@pytest.fixture(scope="session")
def postgres_registry(postgres_url: str) -> Iterator[Registry]:
    """One registry on the session's PostgreSQL database, schema created once."""
    reg = Registry(postgres_url)
    reg.create_schema()
    yield reg
    reg.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Registry]:
    """An empty registry, on SQLite (a file in tmp_path) and on PostgreSQL."""
    if request.param == "postgresql":
        reg = request.getfixturevalue("postgres_registry")
        # DELETE (children first) is much cheaper than TRUNCATE on tiny tables.
        with reg._db.engine.begin() as conn:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))
        yield reg
        return
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.create_schema()
    yield reg
    reg.close()


SHA_A = "a" * 64
SHA_B = "b" * 64


def _version_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "sha256": SHA_A,
        "size_bytes": 1234,
        "method": "difffit",
        "base_model_hash": "base-hash-1",
        "class_names": ["cat", "dog", "fox"],
        "resolution": 32,
        "trainable_params": 4321,
        "metadata": {"objective": "standard", "lr": 0.001},
    }
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def vkw() -> Any:
    """Build valid keyword arguments for Registry.add_version (a fixture so
    test modules need not import conftest, whose name other folders share)."""
    return _version_kwargs


@pytest.fixture(params=["file", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """An empty blob store: a folder in tmp_path, and a fresh bucket on the test S3 server."""
    from adapters_store import FileBlobStore
    from adapters_store.blobstore.s3 import S3BlobStore

    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3BlobStore(request.getfixturevalue("s3_bucket"), "blobs", endpoint_url=endpoint)
