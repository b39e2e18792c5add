"""db.retry_conflicts: a transaction Postgres aborts to break a deadlock or a serialization
conflict is run again, a bounded number of times; any other error is raised at once. The errors
are real ones, raised by Postgres with their SQLSTATE and translated by the driver."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import CONFLICT_ATTEMPTS, is_conflict, retry_conflicts, transaction


def _raise(sessions: sessionmaker[Session], sqlstate: str) -> None:
    with transaction(sessions) as s:
        s.execute(text(f"DO $$ BEGIN RAISE EXCEPTION 'made here' USING ERRCODE = '{sqlstate}'; END $$"))


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])  # deadlock_detected, serialization_failure
def test_a_conflict_is_retried_then_succeeds(sessions: sessionmaker[Session], sqlstate: str) -> None:
    runs: list[int] = []

    def work() -> str:
        runs.append(1)
        if len(runs) < 3:
            _raise(sessions, sqlstate)
        return "done"

    assert retry_conflicts(work, what="test") == "done"
    assert len(runs) == 3


def test_retries_are_bounded(sessions: sessionmaker[Session]) -> None:
    runs: list[int] = []

    def work() -> None:
        runs.append(1)
        _raise(sessions, "40P01")

    with pytest.raises(DBAPIError) as caught:
        retry_conflicts(work, what="test")
    assert is_conflict(caught.value)
    assert len(runs) == CONFLICT_ATTEMPTS


def test_other_database_errors_are_not_retried(sessions: sessionmaker[Session]) -> None:
    runs: list[int] = []

    def work() -> None:
        runs.append(1)
        _raise(sessions, "23505")  # unique_violation: running it again cannot help

    with pytest.raises(DBAPIError) as caught:
        retry_conflicts(work, what="test")
    assert not is_conflict(caught.value)
    assert len(runs) == 1
