"""The registry: one object over the SQL database that service and worker share.

The methods live in one module per concern (tenants, adapters, jobs, blob
references) and
are combined here. Every method opens its own short transaction and returns
frozen records, so a `Registry` is safe to share between threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters_store.db import Database, schema_revision, upgrade_engine, upgrade_schema
from adapters_store.registry_adapters import AdapterOps
from adapters_store.registry_blobs import BlobRefOps
from adapters_store.registry_datasets import DatasetOps
from adapters_store.registry_jobs import JobOps
from adapters_store.registry_tenants import TenantOps
from adapters_store.registry_webhooks import WebhookOps

if TYPE_CHECKING:
    from difffit.settings import Settings


__all__ = ["Registry", "upgrade_schema"]


class Registry(TenantOps, AdapterOps, JobOps, BlobRefOps, DatasetOps, WebhookOps):
    """Tenants, API keys, adapters with immutable versions, jobs, blob references,
    uploaded data sets and the webhook outbox.

    Works on SQLite (the embedded default: foreign keys on, WAL journal)
    and PostgreSQL. Raises the typed errors of `difffit.errors`.
    """

    def __init__(self, database_url: str) -> None:
        """Connect lazily to `database_url` (any SQLAlchemy URL)."""
        self._db = Database(database_url)

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry configured by `settings` (default: SQLite under data_dir)."""
        return cls(settings.resolved_database_url)

    @property
    def database_url(self) -> str:
        """The database URL with any password masked."""
        return self._db.display_url

    def create_schema(self) -> str:
        """Migrate the schema to the newest revision and return it.

        Runs the Alembic migrations (``adapters_store/migrations``) on this
        registry's own engine, so in-memory SQLite works too. Idempotent; a
        database built by ``create_all`` before migrations existed is stamped
        at the initial revision, then upgraded. Raises BackendUnavailable.
        """
        return upgrade_engine(self._db.engine)

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None: no schema yet)."""
        return schema_revision(self._db.engine)

    def ping(self) -> None:
        """Check the database answers; raise BackendUnavailable otherwise."""
        self._db.ping()

    def close(self) -> None:
        """Release pooled connections (the registry stays usable and reconnects)."""
        self._db.dispose()

    def __repr__(self) -> str:
        return f"Registry({self.database_url!r})"
