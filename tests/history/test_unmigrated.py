"""A database nobody has migrated yet is the operator's mistake, not switchyard's bug: every command
says so in one sentence with the fix, on Postgres and on SQLite, and exits 2 without a traceback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.history.helpers import switchyard

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    name = f"sy_unmigrated_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.parametrize("command", [("jobs", "list"), ("stats",), ("batches",)])
@pytest.mark.parametrize("where", ["postgres", "sqlite"])
def test_an_unmigrated_database_gets_one_sentence_naming_the_fix(
    where: str, command: tuple[str, ...], request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    url = request.getfixturevalue("empty_postgres") if where == "postgres" else f"sqlite:///{tmp_path}/empty.db"
    proc = switchyard(url, *command, ok=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no switchyard tables yet" in lines[0], proc.stderr
    assert "run 'switchyard db upgrade' first" in lines[0]
