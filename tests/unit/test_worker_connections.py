"""How many Postgres connections `switchyard worker` opens: --db-connections, else
SWITCHYARD_DB_CONNECTIONS (one value for every worker a host or compose file starts), else the
default for its concurrency; a bad setting stops the worker with one sentence naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli.workergroup import db_connections, default_db_connections
from pipeline.settings import Settings
from tests.cli import invoke


def test_the_flag_then_the_setting_then_the_threads_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default: C/2, between 8 and 32.
    assert [default_db_connections(c) for c in (8, 64, 500)] == [8, 32, 32]
    assert db_connections(64, None, None) == 32
    assert db_connections(64, None, 4) == 4
    assert db_connections(64, 12, 4) == 12
    monkeypatch.setenv("SWITCHYARD_DB_CONNECTIONS", "5")
    assert Settings().worker_db_connections == 5
    monkeypatch.delenv("SWITCHYARD_DB_CONNECTIONS")
    assert Settings().worker_db_connections is None


def test_a_bad_setting_stops_the_worker_with_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/w.sqlite")
    monkeypatch.setenv("BROKER_URL", "memory://")
    monkeypatch.setenv("COLUMNS", "200")
    for value, why in (("0", "greater than or equal to 1"), ("lots", "valid integer")):
        monkeypatch.setenv("SWITCHYARD_DB_CONNECTIONS", value)
        code, out, err = invoke(monkeypatch, capsys, "worker", "--tier", "sonnet")
        lines = err.strip().splitlines()
        assert code == 2 and not out, (value, out, err)
        assert len(lines) == 1 and lines[0].startswith(f"error: SWITCHYARD_DB_CONNECTIONS='{value}'"), err
        assert why in lines[0], err
