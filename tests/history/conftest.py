"""The history tests enqueue hundreds of thousands of jobs that stay queued. In the shared test
database the next dispatcher (another module's cluster, a stage test) would feed those first, so
these tests use databases of their own: `fresh_database(tag)` makes one, migrated to head, and
drops it when the session ends."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import make_engine, session_factory
from tests.cli import invoke


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
        return invoke(monkeypatch, capsys, *args)

    return run


@pytest.fixture
def sy_json(sy: Callable[..., tuple[int, str, str]]) -> Callable[..., Any]:
    def run(*args: str) -> Any:
        code, out, err = sy(*args, "--json")
        assert code == 0, (args, out, err)
        return json.loads(out)

    return run
