"""The pipeline's engine has no pre-ping (it cost a round trip per transaction): a unit of work
that draws a connection Postgres has dropped must be retried by Pipeline.run, not fail the stage."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, insert, select, text

from pipeline.claude.client import ClaudeClient
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory
from pipeline.fake_claude import FakeClaude
from pipeline.flow.stages import Pipeline
from pipeline.models import Batch, utcnow


@pytest.fixture
def pipeline(database_url: str, fake_claude: FakeClaude, models: ModelConfig) -> Iterator[Pipeline]:
    engine = make_engine(database_url, pool_size=2, pre_ping=False)
    client = ClaudeClient(api_key="test", base_url=fake_claude.base_url, attempts=1)
    yield Pipeline(sessions=session_factory(engine), client=client, models=models)
    client.close()
    engine.dispose()


def test_a_connection_killed_in_the_pool_is_replaced_by_the_retry(pipeline: Pipeline, database_url: str) -> None:
    pids = [pipeline.run(lambda s: s.scalar(text("SELECT pg_backend_pid()"))) for _ in range(2)]
    admin = make_engine(database_url, pool_size=1)
    with admin.begin() as conn:  # what a Postgres restart does to every pooled connection
        for pid in set(pids):
            assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()

    def write(conn: Connection) -> int:
        conn.execute(insert(Batch).values(name="after-the-kill", created_at=utcnow()))
        return int(conn.scalar(text("SELECT pg_backend_pid()")))

    new_pid = pipeline.run(write)
    assert new_pid not in pids
    with pipeline.sessions() as s:
        assert s.scalar(select(Batch.id).where(Batch.name == "after-the-kill")) is not None


def test_a_sqlite_programming_error_is_not_retried_as_a_lost_connection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import OperationalError

    sessions = session_factory(make_engine(f"sqlite:///{tmp_path}/x.sqlite"))
    p = Pipeline(sessions=sessions, client=None, models=None, db_retry_s=60)  # type: ignore[arg-type]
    tries: list[int] = []

    def bad_sql(conn: Connection) -> None:
        tries.append(1)
        conn.execute(text("WITH x AS (UPDATE nowhere SET a = 1 RETURNING a) SELECT 1"))

    with pytest.raises(OperationalError, match="syntax error"):
        p.run(bad_sql)
    assert tries == [1]  # raised at once, not retried for a minute as if the server had gone
