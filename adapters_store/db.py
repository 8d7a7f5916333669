"""Engine setup and the transaction helper every registry method goes through.

Two things matter here beyond plumbing:

- SQLite writes start with ``BEGIN IMMEDIATE``. A deferred transaction that
  reads and then writes can fail at once with "database is locked" when
  another writer got in between, without waiting on the busy timeout;
  taking the write lock up front makes concurrent writers queue instead.
  Reads keep a plain ``BEGIN`` so WAL readers never wait for writers.
- Write transactions are retried on unique-constraint violations. The
  methods re-run their checks on retry, so the loser of a race (two
  ``add_version`` calls, two ``create_job`` calls with one idempotency key)
  sees the winner's row and does the right thing.

The schema is owned by Alembic (``adapters_store/migrations``):
`upgrade_schema` / `upgrade_engine` bring a database to the head revision,
stamping one that ``metadata.create_all`` built before migrations existed.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from difffit.errors import BackendUnavailable, Conflict

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")

_WRITE_OPTION = "difffit_write"
MAX_ATTEMPTS = 20


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


SQLITE_BUSY_TIMEOUT_S = 30.0


def _set_wal(cursor: Any, timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds a lock.

    Switching a fresh file to WAL needs an exclusive lock, and SQLite answers
    "database is locked" at once instead of calling its busy handler, so N
    processes opening a new registry together (workers starting at once) would
    fail. The mode is stored in the file: once one connection wins, the others'
    pragma is a no-op.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(delay, 2 * delay))
            delay = min(delay * 2, 0.2)


def build_engine(database_url: str) -> Engine:
    """Create the engine for `database_url` with the per-backend settings."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)

    database = url.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
    kwargs: dict[str, Any] = {
        # Worker threads share the engine's pool; each connection is still
        # used by one thread at a time, which is what SQLite needs.
        "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        "pool_pre_ping": True,
    }
    if in_memory:
        # Every new connection to :memory: is a different, empty database.
        kwargs["poolclass"] = StaticPool
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy (see the "begin" hook).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            if not in_memory:
                _set_wal(cursor, SQLITE_BUSY_TIMEOUT_S)
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def _is_sqlite_busy(exc: OperationalError) -> bool:
    return "database is locked" in str(exc.orig) or "database is busy" in str(exc.orig)


class Database:
    """An engine, a session factory and the retrying transaction runner."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.engine = build_engine(database_url)
        self.is_sqlite = _is_sqlite(database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def display_url(self) -> str:
        """The URL with any password masked, for messages and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    def ping(self) -> None:
        """Run ``SELECT 1``; raise BackendUnavailable when the database is down."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (OperationalError, InterfaceError, OSError) as exc:
            raise BackendUnavailable(
                f"registry database at {self.display_url} is unreachable: {exc}"
            ) from exc

    def read(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` in a read transaction and return its (record) result."""
        return self._run(fn, write=False)

    def write(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` in a write transaction, retrying on unique violations.

        `fn` must be safe to re-run: it sees a fresh session each attempt.
        """
        return self._run(fn, write=True)

    def _run(self, fn: Callable[[Session], T], *, write: bool) -> T:
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                with self._sessions.begin() as session:
                    if write:
                        session.connection(execution_options={_WRITE_OPTION: True})
                    else:
                        session.connection()
                    return fn(session)
            except IntegrityError as exc:
                if not write:
                    raise
                last = exc
            except OperationalError as exc:
                if not (self.is_sqlite and _is_sqlite_busy(exc)):
                    raise BackendUnavailable(
                        f"registry database at {self.display_url} failed: {exc.orig}"
                    ) from exc
                last = exc
            except InterfaceError as exc:
                raise BackendUnavailable(
                    f"registry database at {self.display_url} failed: {exc.orig}"
                ) from exc
            # Jittered backoff so racing writers do not collide again in step.
            time.sleep(random.uniform(0.001, 0.005) * (attempt + 1))
        raise Conflict(
            f"registry write kept conflicting with concurrent writers after "
            f"{MAX_ATTEMPTS} attempts: {getattr(last, 'orig', last)}"
        )

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()


# --- schema migrations ------------------------------------------------------------

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The revision whose schema equals what `metadata.create_all` built before
# migrations existed, and the tables it has.
INITIAL_REVISION = "0001"
INITIAL_TABLES = frozenset({"tenants", "api_keys", "adapters", "adapter_versions", "jobs", "job_events"})
# pg_advisory_xact_lock key: concurrent upgrades (N workers starting at once)
# queue behind one another instead of racing on CREATE TABLE.
_PG_MIGRATION_LOCK = 0x0D1FF_F17


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic Config built in code: no alembic.ini, any working directory.

    `script_location` is the ``migrations`` folder inside this package, so it
    works from a source checkout and from an installed wheel alike.
    """
    from alembic.config import Config

    cfg = Config()
    # The Config is a ConfigParser: a literal % must be doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest revision shipped in ``adapters_store/migrations/versions``."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


@lru_cache(maxsize=1)
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def _current_revision(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None: not under migrations)."""
    with engine.connect() as conn:
        return _current_revision(conn)


def _display(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def upgrade_engine(engine: Engine) -> str:
    """Bring the registry schema on `engine` to the head revision; return it.

    Idempotent and cheap when the database is already at head (one read of
    ``alembic_version``). Otherwise the whole upgrade runs in one transaction
    that holds the database's write lock (``BEGIN IMMEDIATE`` on SQLite, an
    advisory lock on PostgreSQL), so concurrent callers wait and then find
    the work done. A database that ``metadata.create_all`` built before
    migrations existed (registry tables, no ``alembic_version``) is stamped
    at the initial revision first, then upgraded like any other.

    Raises BackendUnavailable when the database is unreachable, only part of
    the initial schema exists, or the database is at a revision this release
    does not ship (a newer release migrated it).
    """
    from alembic import command

    head = head_revision()
    try:
        if schema_revision(engine) == head:
            return head
        cfg = alembic_config()
        with engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                current = _current_revision(conn)
                if current is not None and current not in _known_revisions():
                    raise BackendUnavailable(
                        f"registry schema at {_display(engine)} is at revision {current!r}, which this "
                        f"release does not know (its newest is {head!r}); run the matching release"
                    )
                # env.py migrates this connection inside this transaction.
                cfg.attributes["connection"] = conn
                if current is None:
                    present = set(inspect(conn).get_table_names()) & INITIAL_TABLES
                    if present == INITIAL_TABLES:
                        command.stamp(cfg, INITIAL_REVISION)
                    elif present:
                        raise BackendUnavailable(
                            f"registry database at {_display(engine)} has only some registry tables "
                            f"({', '.join(sorted(present))}) and no alembic_version; refusing to migrate"
                        )
                command.upgrade(cfg, "head")
                return _current_revision(conn) or head
    except (OperationalError, InterfaceError) as exc:
        raise BackendUnavailable(
            f"cannot migrate the registry schema at {_display(engine)}: {exc.orig}"
        ) from exc


def upgrade_schema(database_url: str) -> None:
    """``alembic upgrade head`` on `database_url`, run in code (see `upgrade_engine`)."""
    engine = build_engine(database_url)
    try:
        upgrade_engine(engine)
    finally:
        engine.dispose()


def database_revision(database_url: str) -> str | None:
    """The Alembic revision of the database at `database_url` (None: none yet)."""
    engine = build_engine(database_url)
    try:
        return schema_revision(engine)
    except (OperationalError, InterfaceError) as exc:
        raise BackendUnavailable(f"registry database at {_display(engine)} failed: {exc.orig}") from exc
    finally:
        engine.dispose()
