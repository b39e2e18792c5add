"""Shared fixtures: a fresh Postgres database built by the real migrations, a Redis database of
this run's own, and the fake Claude over HTTP.

Isolation between test runs on one machine (several developers' runs can share the services):
each test module gets a Postgres database of its own (a copy of one migrated once per session) and
drops it afterwards, and a session uses the Redis database number in SWITCHYARD_TEST_REDIS_DB
(default 9), which is flushed before each module that uses it. Under pytest-xdist (`make test`
runs two processes) each worker is such a session, with the next number.
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


def pytest_configure(config: pytest.Config) -> None:
    # The benchmark smoke tests run the benchmarks, which flush a Redis database of their own: one
    # past the sessions' numbers, so that neither this run's other tests nor a `make bench` running
    # beside them lose their queues. Not in xdist's controller: its workers inherit its environment,
    # and a number it set (from its own count of one session) would be the second worker's.
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    os.environ.setdefault("SWITCHYARD_BENCH_REDIS_DB",
                          str(REDIS_DB + int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    # ...and only that one: benchmarks a test runs side by side run one after another instead of
    # taking the databases a `make bench` beside this run uses for its own (bench.env.LANE_DBS).
    os.environ.setdefault("SWITCHYARD_BENCH_LANE_DBS", "")


def _admin_engine() -> Engine:
    # No pool: the fault tests restart Postgres mid-session, and a pooled admin connection would be
    # dead for every database made after that.
    return create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)


@pytest.fixture(scope="session")
def fresh_database() -> Iterator[Callable[[str], str]]:
    """``fresh_database(tag)`` makes a new database, migrated to head with the real migrations, and
    drops it when the session ends. Tests that leave many jobs queued use one of their own: in a
    shared database the next dispatcher to run (another module's cluster) would feed those first.

    The migrations run once per session, into a template database; each new database is a copy of
    it (CREATE DATABASE ... TEMPLATE), which takes a fraction of the time the migrations take, so
    every module can afford a database of its own."""
    admin = _admin_engine()
    made: list[str] = []
    template: list[str] = []

    def create(name: str, *, template_of: str | None = None) -> str:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template_of}"' if template_of else "")))
        made.append(name)
        return f"{PG_SERVER}/{name}"

    def make(tag: str) -> str:
        if not template:
            name = f"sy_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            url = create(name)
            # No pool: a template can only be copied while nobody is connected to it.
            migrator = create_engine(url, poolclass=NullPool)
            try:
                migrate.upgrade(url, engine=migrator)
            finally:
                migrator.dispose()
            template.append(name)
        return create(f"sy_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}", template_of=template[0])

    try:
        yield make
    finally:
        with admin.connect() as conn:
            for name in reversed(made):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# One database per test module: a module whose jobs did not all end (a failed case, a fault left
# behind on purpose) must not hand them to the next module's cluster, whose dispatcher would feed
# them to its workers, against its own fake, and break that module's exactly-once checks.
@pytest.fixture(scope="module")
def database_url(fresh_database: Callable[[str], str], request: pytest.FixtureRequest) -> Iterator[str]:
    """The database a module's tests share, migrated to head with `alembic upgrade head`; dropped
    after the module (its engine, a later fixture, is disposed first)."""
    url = fresh_database(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:20])
    yield url
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module", autouse=True)
def _empty_broker(request: pytest.FixtureRequest) -> None:
    """Each module that uses the broker starts with it empty. Its database is new (database_url),
    so its job ids start at 1 again: a message a previous module left queued would name one of this
    module's jobs, and its workers would take it."""
    if any("broker_url" in getattr(item, "fixturenames", ()) for item in request.session.items
           if getattr(item, "module", None) is request.module):
        redis.Redis.from_url(request.getfixturevalue("broker_url")).flushdb()


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
