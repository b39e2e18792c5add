"""The history tests enqueue hundreds of thousands of jobs that stay queued. In the shared test
database the next dispatcher (another module's cluster, a stage test) would feed those first, so
these tests use databases of their own: `fresh_database(tag)` makes one, migrated to head, and
drops it when the session ends."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from pipeline import cli, migrate
from pipeline.db import make_engine, session_factory
from tests.conftest import PG_SERVER


@pytest.fixture(scope="session")
def fresh_database() -> Iterator[Callable[[str], str]]:
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"sy_hist_{tag}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
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


@pytest.fixture(scope="module")
def history_url(fresh_database: Callable[[str], str], request: pytest.FixtureRequest) -> str:
    """A database of this test module's own."""
    return fresh_database(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))


@pytest.fixture(scope="module")
def history_sessions(history_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(history_url, pool_size=2)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def sy(history_url: str, monkeypatch: pytest.MonkeyPatch,
       capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`switchyard ARGS...` in this process, through the real entry point (cli.main), for tests
    that run many commands; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("DATABASE_URL", history_url)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["switchyard", *args])
        code: Any = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return int(code), out.out, out.err

    return run


@pytest.fixture
def sy_json(sy: Callable[..., tuple[int, str, str]]) -> Callable[..., Any]:
    def run(*args: str) -> Any:
        code, out, err = sy(*args, "--json")
        assert code == 0, (args, out, err)
        return json.loads(out)

    return run
