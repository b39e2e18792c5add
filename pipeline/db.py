"""Engine and session factory. Postgres in production; SQLite for the embedded demo."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, MetaData, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Stable constraint names, so that Alembic autogenerate and hand-written migrations agree.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

log = logging.getLogger("switchyard.db")
T = TypeVar("T")


# What runs a statement: an ORM Session, or a Core Connection where the ORM's unit-of-work
# bookkeeping would be pure cost (the stages' hot path, Pipeline.run). Both have execute, scalar and
# scalars; the state machine and the dispatcher take either.
Executor = Session | Connection


def dialect_name(db: Executor) -> str:
    return db.dialect.name if isinstance(db, Connection) else db.get_bind().dialect.name


def insert_or_skip(db: Executor, table: Any) -> Any:
    """An INSERT in this database's dialect, so that it can take ``on_conflict_do_nothing()``: for
    rows two writers may both create (a batch, a tenant), where the loser should find the
    winner's row rather than fail."""
    return pg_insert(table) if dialect_name(db) == "postgresql" else sqlite_insert(table)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def normalise_url(url: str) -> str:
    """Accept the usual ``postgresql://`` spelling and use psycopg 3 for it."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def make_engine(url: str, *, pool_size: int = 10, pre_ping: bool = True, max_overflow: int | None = None) -> Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets the demo's embedded workers read while one of them writes.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # pool_pre_ping: a long-lived process (the API, `status --watch`) outlives Postgres restarts; a
    # dead pooled connection is replaced before use instead of failing the request that drew it. It
    # costs a round trip per checkout, so the workers and the dispatcher, whose Pipeline.run retries
    # a unit of work that fails on a dead connection, turn it off (runtime.build_pipeline).
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back and re-raise on error, always close."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# The SQLSTATEs with which Postgres aborts a transaction to resolve a conflict with another one:
# serialization_failure and deadlock_detected. Nothing of the aborted transaction is kept, and the
# same work run again will most likely go through.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
CONFLICT_ATTEMPTS = 4


def is_conflict(exc: BaseException) -> bool:
    """True if Postgres aborted the transaction to break a deadlock or a serialization conflict."""
    # SQLAlchemy wraps the driver's error; the COPYs of an enqueue, run on the driver's own
    # connection, raise it bare.
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return getattr(orig, "sqlstate", None) in CONFLICT_SQLSTATES


def retry_conflicts(work: Callable[[], T], *, what: str, attempts: int = CONFLICT_ATTEMPTS) -> T:
    """Run ``work``, one whole transaction from its first statement, again when Postgres aborts it
    as the loser of a deadlock or a serialization conflict, up to ``attempts`` runs in all; then
    the last error is raised. The random pause keeps two losers from meeting again in step."""
    attempt = 1
    while True:
        try:
            return work()
        except (DBAPIError, psycopg.Error) as exc:
            if attempt >= attempts or not is_conflict(exc):
                raise
            attempt += 1
            log.warning("%s: the database aborted it (%s); retrying, attempt %d of %d", what,
                        type(exc.orig if isinstance(exc, DBAPIError) else exc).__name__, attempt, attempts)
            time.sleep(random.uniform(0.01, 0.05 * attempt))
