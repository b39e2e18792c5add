"""The warm-up gate on the real database: one caller of a cold prefix takes the lease, the others
wait; the lease lapses; warmth expires with the TTL. Each gate stands for one worker process (its
own memo), each connection for one of its calls."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from pipeline import migrate
from pipeline.db import make_engine
from pipeline.flow.warmup import Admission, PrefixKey, WarmupGate, prefix_key
from pipeline.models import CacheWarmup

T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
TTL = 300.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest, engine: Engine, tmp_path: Path) -> Iterator[Engine]:
    """The shared Postgres database, and the embedded demo's SQLite, built by the migrations."""
    if request.param == "postgresql":
        yield engine
        return
    url = f"sqlite:///{tmp_path}/warm.sqlite"
    migrate.upgrade(url)
    lite = make_engine(url)
    yield lite
    lite.dispose()


@pytest.fixture
def key() -> PrefixKey:
    # A prefix of its own per test: the Postgres database is shared by the whole session.
    return prefix_key("claude-haiku-test", system=f"shared part {uuid.uuid4()}", ttl="5m")


def admit(db: Engine, gate: WarmupGate, key: PrefixKey, now: datetime) -> Admission:
    with db.connect() as conn:
        admission = gate.admit(conn, key, now=now)
        conn.commit()
    return admission


def warmed(db: Engine, gate: WarmupGate, key: PrefixKey, until: datetime) -> None:
    with db.begin() as conn:
        gate.warmed(conn, key, until=until)


def test_the_key_is_the_model_and_the_exact_prefix_and_ttl() -> None:
    base = prefix_key("m", system="abc", ttl="5m")
    assert base == prefix_key("m", system="abc", ttl="5m")
    assert len({base, prefix_key("n", system="abc", ttl="5m"), prefix_key("m", system="abc ", ttl="5m"),
                prefix_key("m", system="abc", ttl="1h"),
                prefix_key("m", system="abc", ttl="5m", output_schema={"type": "object"})}) == 5


def test_one_of_two_contenders_warms_and_the_other_waits_then_reads(db: Engine, key: PrefixKey) -> None:
    first, second = WarmupGate(lease_s=30), WarmupGate(lease_s=30)
    lead = admit(db, first, key, at(0))
    assert lead.go and lead.lease is not None
    held = admit(db, second, key, at(0.1))
    assert not held.go and held.lease is None and held.wait_s >= second.min_wait_s
    # The warmer asking again (another of its process's calls) waits too: one call warms.
    assert not admit(db, first, key, at(0.2)).go

    warmed(db, first, key, at(0) + timedelta(seconds=TTL))
    after = admit(db, second, key, at(1))
    assert after.go and after.lease is None
    with db.connect() as conn:
        row = conn.execute(select(CacheWarmup).where(CacheWarmup.model == key.model,
                                                     CacheWarmup.prefix_sha256 == key.digest)).one()
    assert row.lease_token is None and row.lease_until is None


def test_of_many_racing_contenders_exactly_one_takes_the_lease(db: Engine, key: PrefixKey) -> None:
    n = 8
    start = threading.Barrier(n)
    got: list[Admission] = []
    lock = threading.Lock()

    def contend() -> None:
        gate = WarmupGate(lease_s=30)
        with db.connect() as conn:
            conn.execute(select(1))  # connected before the start, so that they meet at the database
            conn.commit()
            start.wait()
            admission = gate.admit(conn, key, now=datetime.now(UTC))
            conn.commit()
        with lock:
            got.append(admission)

    threads = [threading.Thread(target=contend) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == n
    assert sum(a.lease is not None for a in got) == 1
    assert sum(a.go for a in got) == 1


def test_a_lease_lapses_and_the_next_caller_takes_it_over(db: Engine, key: PrefixKey) -> None:
    dead, other, third = WarmupGate(lease_s=30), WarmupGate(lease_s=30), WarmupGate(lease_s=30)
    first = admit(db, dead, key, at(0))
    assert first.lease is not None
    waiting = admit(db, other, key, at(29))
    # Never past the lease's end: a waiter comes back when a dead warmer's lease lapses.
    assert not waiting.go and waiting.wait_s <= 1.0 + 1e-6
    taken = admit(db, other, key, at(30.5))
    assert taken.go and taken.lease not in (None, first.lease)
    assert not admit(db, third, key, at(31)).go  # the new lease holds the others again
    # The dead warmer's late release frees nothing: the lease is no longer its.
    with db.begin() as conn:
        dead.release(conn, first)
    assert not admit(db, third, key, at(32)).go


def test_a_failed_warmer_gives_the_lease_up_at_once(db: Engine, key: PrefixKey) -> None:
    failed, other = WarmupGate(lease_s=30), WarmupGate(lease_s=30)
    lead = admit(db, failed, key, at(0))
    with db.begin() as conn:
        failed.release(conn, lead)
    again = admit(db, other, key, at(1))
    assert again.go and again.lease is not None


def test_warmth_expires_with_the_ttl_and_the_prefix_is_warmed_again(db: Engine, key: PrefixKey) -> None:
    gate, fresh = WarmupGate(lease_s=30), WarmupGate(lease_s=30)
    assert admit(db, gate, key, at(0)).lease is not None
    warmed(db, gate, key, at(TTL))
    assert admit(db, gate, key, at(TTL - 1)) == Admission(key, go=True)  # from the memo
    assert admit(db, fresh, key, at(TTL - 1)) == Admission(key, go=True)  # from the database
    # Expired: the memo no longer says warm, nor does the database; one caller warms it again.
    again = admit(db, gate, key, at(TTL + 1))
    assert again.go and again.lease is not None
    assert not admit(db, fresh, key, at(TTL + 1.5)).go


def test_warmth_is_pushed_on_by_later_answers_but_written_only_past_half_the_ttl(db: Engine,
                                                                                key: PrefixKey) -> None:
    gate = WarmupGate(lease_s=30)
    assert admit(db, gate, key, at(0)).lease is not None
    warmed(db, gate, key, at(TTL))
    assert not gate.due(key, now=at(100), ttl_s=TTL)  # 200 s of 300 left: no write
    assert gate.due(key, now=at(200), ttl_s=TTL)      # 100 s left
    warmed(db, gate, key, at(200 + TTL))
    # Another process, without a memo, finds it warm past the first TTL.
    assert admit(db, WarmupGate(), key, at(TTL + 50)).go
    # A late answer of an earlier call does not pull it back.
    warmed(db, WarmupGate(), key, at(TTL + 10))
    with db.connect() as conn:
        until = conn.scalar(select(CacheWarmup.warm_until).where(CacheWarmup.prefix_sha256 == key.digest))
    assert until is not None and until.replace(tzinfo=UTC) == at(200 + TTL)


def test_the_wait_grows_with_the_warm_up_and_stays_bounded(db: Engine, key: PrefixKey) -> None:
    gate = WarmupGate(lease_s=60, min_wait_s=0.5, max_wait_s=10)
    assert admit(db, WarmupGate(lease_s=60), key, at(0)).lease is not None
    assert admit(db, gate, key, at(0.1)).wait_s == 0.5
    assert admit(db, gate, key, at(4)).wait_s == pytest.approx(4)
    assert admit(db, gate, key, at(40)).wait_s == 10
