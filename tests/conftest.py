"""Shared fixtures: a fresh Postgres database built by the real migrations, a Redis database of
this run's own, and the fake Claude over HTTP.

Isolation between test runs on one machine (several developers' runs can share the services):
each session creates its own Postgres database and drops it afterwards, and uses the Redis
database number in SWITCHYARD_TEST_REDIS_DB (default 9), which it flushes at the start. Under
pytest-xdist (`make test` runs two processes) each worker is such a session, with the next number.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from pipeline import migrate
from pipeline.config import ModelConfig, load_config
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import FakeClaude
from tests import figures

PG_SERVER = os.environ.get("SWITCHYARD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("SWITCHYARD_TEST_REDIS", "redis://127.0.0.1:6379")
# Under pytest-xdist each worker process is a session of its own: it takes the next database number,
# so that one session's FLUSHDB and queues never reach the other's.
REDIS_DB = int(os.environ.get("SWITCHYARD_TEST_REDIS_DB", "9")) + int(
    os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
# An xdist worker starts with COLUMNS=80 and LINES=24 in its environment, which Rich's consoles (made
# at import) would keep as a fixed width; tests that set COLUMNS themselves then print at 80 columns.
# Without them, as in a plain run, the width is read again at every print.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
# The benchmark smoke tests run the benchmarks, which flush a Redis database of their own: one past
# the sessions' numbers, so that neither this run's other tests nor a `make bench` running beside
# them lose their queues.
os.environ.setdefault("SWITCHYARD_BENCH_REDIS_DB",
                      str(REDIS_DB + int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def _admin_engine() -> Engine:
    # No pool: the fault tests restart Postgres mid-session, and a pooled admin connection would be
    # dead for every database made after that.
    return create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)


@pytest.fixture(scope="session")
def fresh_database() -> Iterator[Callable[[str], str]]:
    """``fresh_database(tag)`` makes a new database, migrated to head with the real migrations, and
    drops it when the session ends. Tests that leave many jobs queued use one of their own: in a
    shared database the next dispatcher to run (another module's cluster) would feed those first."""
    admin = _admin_engine()
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"sy_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        url = f"{PG_SERVER}/{name}"
        migrate.upgrade(url)
        return url

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(fresh_database: Callable[[str], str]) -> str:
    """The database most tests share, migrated to head with `alembic upgrade head`."""
    return fresh_database("test")


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def db(engine: Engine) -> Iterator[Session]:
    """A session inside a transaction that is rolled back after the test."""
    conn = engine.connect()
    trans = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        trans.rollback()
        conn.close()


@pytest.fixture(scope="session")
def broker_url() -> str:
    url = f"{REDIS_SERVER}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    # Another run's workers on this number would take this run's tasks and work the same job ids in
    # their own database, against their own fake Claude: calls the fault invariants then find
    # unrecorded, jobs that never finish. Every run on the machine must have numbers of its own.
    # A run that just ended (make test's first pass, before its serial one) may still be closing:
    # its connections get half a minute to go.
    me = str(client.client_id())
    deadline = time.monotonic() + 30
    while (others := [c for c in client.client_list() if c.get("db") == str(REDIS_DB) and str(c.get("id")) != me]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    if others:
        pytest.exit(f"Redis database {REDIS_DB} is in use by {len(others)} other connection(s) (another test run "
                    f"or its workers): set SWITCHYARD_TEST_REDIS_DB to a number no other run uses", returncode=3)
    client.flushdb()
    return url


@pytest.fixture(scope="session")
def models() -> ModelConfig:
    return load_config()


def free_form(config: ModelConfig) -> ModelConfig:
    """``config`` with structured outputs off at every tier: the answers come as free text, and
    validation is all that stands between a bad one and the job's output."""
    return replace(config, tiers={name: replace(t, structured_outputs=False) for name, t in config.tiers.items()})


def free_form_config_file(path: Path) -> Path:
    """The bundled configuration with structured outputs off at every tier, written to ``path``,
    for worker processes (SWITCHYARD_CONFIG)."""
    text = resources.files("pipeline").joinpath("defaults.toml").read_text()
    assert text.count("structured_outputs = true") == 3, "defaults.toml changed: update this helper"
    path.write_text(text.replace("structured_outputs = true", "structured_outputs = false"))
    return path


@pytest.fixture(scope="session")
def free_form_models(models: ModelConfig) -> ModelConfig:
    return free_form(models)


@pytest.fixture(scope="session")
def fake_claude() -> Iterator[FakeClaude]:
    """The fake Claude on a free port, shared by the session. Tests steer it with hints in the
    job text, and read its counters through .stats() and .requests()."""
    with FakeClaude(port=0) as fake:
        yield fake


# The fault matrix's figures reach the terminal from xdist workers too (tests/figures.py).
def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        figures.hand_over(workeroutput)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    figures.take_over(getattr(node, "workeroutput", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    figures.report(terminalreporter)
