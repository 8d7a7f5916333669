"""Alembic environment of the registry schema.

The database comes, in this order, from a connection handed over in
``config.attributes["connection"]`` (what `adapters_store.db.upgrade_engine`
does, so a registry migrates on its own engine), ``-x url=...`` on the alembic
command line, ``sqlalchemy.url`` set on the Config, and otherwise from the
settings: ``DIFFFIT_DATABASE_URL``, or the default SQLite file under
``DIFFFIT_DATA_DIR``.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, make_url

from adapters_store.models import Base

config = context.config

# Only the alembic command line configures logging from alembic.ini; a Config
# built in code (the service, workers, `difffit db upgrade`) has no file.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from difffit.settings import Settings

    return Settings().resolved_database_url


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``alembic upgrade head --sql``)."""
    url = _database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=_is_sqlite(url),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later migrations copy-and-move tables.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the handed-over connection, or one opened on the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from adapters_store.db import build_engine

    engine = build_engine(_database_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
