"""The dispatcher's admission (pipeline.flow.admission): priorities first, then round robin across
tenants (weighted), then across a tenant's batches. The policy on its own, then read from a real
Postgres database of this module's own (queued jobs left in the shared one would be admitted by
other modules' dispatchers), each test in a transaction rolled back afterwards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from itertools import count

import pytest
from sqlalchemy import Connection, Engine, text

from pipeline.db import make_engine
from pipeline.flow import admission
from pipeline.flow.admission import Group, admit, allocate, message_priority, with_priorities
from pipeline.flow.dispatch import dispatch
from pipeline.flow.stages import SHADOW_PRIORITY, Handoff

# -- the policy alone ---------------------------------------------------------------------------------


def test_a_higher_priority_takes_the_room_before_any_lower_one() -> None:
    groups = [Group(1, priority=5, tenant_id=1), Group(2, priority=9, tenant_id=2, available=30),
              Group(3, priority=0, tenant_id=3)]
    assert allocate(50, groups) == {2: 30, 1: 20}


def test_tenants_share_the_room_round_robin_whatever_their_batches_sizes() -> None:
    groups = [Group(1, priority=5, tenant_id=1), Group(2, priority=5, tenant_id=2)]
    assert allocate(10, groups) == {1: 5, 2: 5}


def test_the_tenant_furthest_below_its_share_of_jobs_in_flight_gets_the_places() -> None:
    # Tenant 1 holds 100 places already: the 30 freed all go to tenant 2, then they alternate.
    groups = [Group(1, priority=5, tenant_id=1, in_flight=100), Group(2, priority=5, tenant_id=2, in_flight=80)]
    assert allocate(30, groups) == {2: 25, 1: 5}
    # One place at a time, as a saturated pipeline frees them: still to whoever is furthest below.
    assert allocate(1, groups) == {2: 1}


def test_weights_give_proportional_shares() -> None:
    groups = [Group(1, priority=5, tenant_id=1, weight=3), Group(2, priority=5, tenant_id=2, weight=1)]
    assert allocate(40, groups) == {1: 30, 2: 10}


def test_within_a_tenant_its_batches_take_turns_and_the_tenant_keeps_one_share() -> None:
    groups = [Group(1, priority=5, tenant_id=7), Group(2, priority=5, tenant_id=7), Group(3, priority=5, tenant_id=8)]
    assert allocate(12, groups) == {1: 3, 2: 3, 3: 6}


def test_the_operators_own_batches_count_as_one_tenant() -> None:
    groups = [Group(1, priority=5, tenant_id=None), Group(2, priority=5, tenant_id=None),
              Group(3, priority=5, tenant_id=4)]
    assert allocate(8, groups) == {1: 2, 2: 2, 3: 4}


def test_each_priority_counts_only_the_jobs_in_flight_at_it_or_above() -> None:
    groups = [Group(1, priority=9, tenant_id=1, available=5), Group(2, priority=5, tenant_id=2)]
    # 10 places for 9 and above; 3 for 5 and above, and the 5 given at 9 this round count there too.
    assert allocate(100, groups, level_room={9: 10, 5: 3}) == {1: 5}
    assert allocate(100, groups, level_room={9: 10, 5: 8}) == {1: 5, 2: 3}


def test_what_a_batch_cannot_give_goes_to_the_others_then_to_the_next_priority() -> None:
    groups = [Group(1, priority=9, tenant_id=1, available=2), Group(2, priority=9, tenant_id=2, available=3),
              Group(3, priority=4, tenant_id=1)]
    assert allocate(10, groups) == {1: 2, 2: 3, 3: 5}


def test_nothing_to_admit_or_no_room_admits_nothing() -> None:
    assert allocate(10, []) == {}
    assert allocate(0, [Group(1, priority=5, tenant_id=1)]) == {}
    assert allocate(10, [Group(1, priority=5, tenant_id=1, available=0)]) == {}


def test_every_batch_priority_has_a_broker_level_before_the_shadows() -> None:
    levels = [message_priority(p) for p in range(admission.MIN_PRIORITY, admission.MAX_PRIORITY + 1)]
    assert levels == [8, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # 9, admitted first, is also popped first
    assert SHADOW_PRIORITY == admission.LAST_BROKER_PRIORITY and max(levels) < SHADOW_PRIORITY


# -- from Postgres -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admission_engine(fresh_database: Callable[[str], str]) -> Iterator[Engine]:
    engine = make_engine(fresh_database("admission"), pool_size=2)
    yield engine
    engine.dispose()


@pytest.fixture
def conn(admission_engine: Engine) -> Iterator[Connection]:
    with admission_engine.connect() as c:
        trans = c.begin()
        try:
            yield c
        finally:
            trans.rollback()


_names = count()


def tenant(conn: Connection, *, weight: float = 1.0) -> int:
    return int(conn.execute(text("INSERT INTO tenants (name, weight) VALUES (:n, :w) RETURNING id"),
                            {"n": f"t{next(_names)}", "w": weight}).scalar_one())


def batch(conn: Connection, jobs: int, *, tenant_id: int | None = None, priority: int = 5,
          running: int = 0) -> int:
    """A batch of ``jobs`` queued jobs, and ``running`` more in a stage."""
    bid = int(conn.execute(text("INSERT INTO batches (name, tenant_id, priority) VALUES (:n, :t, :p) RETURNING id"),
                           {"n": f"b{next(_names)}", "t": tenant_id, "p": priority}).scalar_one())
    conn.execute(text("""
        INSERT INTO jobs (batch_id, key, kind, payload, status)
        SELECT :b, 'k' || g, 'generate', '{"prompt": "x"}',
               CASE WHEN g <= :running THEN 'working' ELSE 'queued' END
        FROM generate_series(1, :n) g ORDER BY g"""), {"b": bid, "n": jobs + running, "running": running})
    return bid


def admitted(conn: Connection, room: int, *, max_in_flight: int = 10**6) -> Counter[int]:
    rows = admit(conn, max_in_flight=max_in_flight, limit=room)
    assert len({r.id for r in rows}) == len(rows) <= room
    ids = [r.id for r in rows]
    by_batch = dict(conn.execute(text("SELECT id, batch_id FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).all())
    return Counter(by_batch[i] for i in ids)


def test_a_later_urgent_batch_is_admitted_ahead_of_a_large_backlog(conn: Connection) -> None:
    backlog = batch(conn, 5000, tenant_id=tenant(conn))
    urgent = batch(conn, 40, tenant_id=tenant(conn), priority=9)
    assert admitted(conn, 100) == {urgent: 40, backlog: 60}


def test_another_tenants_batch_gets_the_places_freed_until_it_holds_half(conn: Connection) -> None:
    a, b = tenant(conn), tenant(conn)
    backlog = batch(conn, 5000, tenant_id=a, running=20)
    newer = batch(conn, 500, tenant_id=b)
    assert admitted(conn, 30) == {newer: 25, backlog: 5}


def test_a_backlogs_jobs_in_flight_hold_no_place_against_a_higher_priority(conn: Connection) -> None:
    bulk = tenant(conn)
    backlog = batch(conn, 500, tenant_id=bulk, running=20)
    newer = batch(conn, 50, tenant_id=tenant(conn))
    # Full at priority 5: another tenant's batch at 5 waits for places to free up...
    assert admitted(conn, 1000, max_in_flight=20) == {}
    # ...but one at 9 does not: the 20 in flight at 5 do not count against it, and it takes all
    # 20 places of its own while nothing at 5 is admitted.
    urgent = batch(conn, 100, tenant_id=bulk, priority=9)
    assert admitted(conn, 1000, max_in_flight=20) == {urgent: 20}
    assert admitted(conn, 1000, max_in_flight=30) == {urgent: 30}
    del backlog, newer


def test_jobs_parked_for_a_message_batch_hold_no_place_until_their_answer_wakes_them(conn: Connection) -> None:
    """An economy job waiting for its message batch (parked, not_before an hour ahead) holds no
    message, thread or broker place: it is not in flight. Woken (not_before now), it is again."""
    economy = batch(conn, 100, tenant_id=tenant(conn), running=20)
    conn.execute(text("UPDATE jobs SET parked = true, not_before = now() + interval '1 hour' "
                      "WHERE batch_id = :b AND status = 'working'"), {"b": economy})
    assert admitted(conn, 1000, max_in_flight=20) == {economy: 20}  # the 20 parked take no place
    # A transient wait (not parked) still holds its place: its job comes back within minutes.
    conn.execute(text("UPDATE jobs SET parked = false WHERE batch_id = :b AND status = 'working'"), {"b": economy})
    assert admitted(conn, 1000, max_in_flight=20) == {}
    # Parked again, then woken by their answers: in flight again.
    conn.execute(text("UPDATE jobs SET parked = true, not_before = now() - interval '1 second' "
                      "WHERE batch_id = :b AND status = 'working'"), {"b": economy})
    assert admitted(conn, 1000, max_in_flight=20) == {}


def test_weights_and_batches_within_a_tenant_from_postgres(conn: Connection) -> None:
    heavy, light = tenant(conn, weight=3), tenant(conn, weight=1)
    h1, h2 = batch(conn, 1000, tenant_id=heavy), batch(conn, 1000, tenant_id=heavy)
    l1 = batch(conn, 1000, tenant_id=light)
    assert admitted(conn, 40) == {h1: 15, h2: 15, l1: 10}


def test_a_batch_that_runs_out_hands_its_share_on_in_the_same_round(conn: Connection) -> None:
    small = batch(conn, 3, tenant_id=tenant(conn))
    big = batch(conn, 1000, tenant_id=tenant(conn))
    other = batch(conn, 2, tenant_id=tenant(conn))
    assert admitted(conn, 30) == {small: 3, other: 2, big: 25}
    # ...and the oldest of each batch first.
    rows = admit(conn, max_in_flight=10**6, limit=5)
    assert [r.id for r in rows] == sorted(r.id for r in rows)


def test_with_nothing_queued_nothing_is_admitted(conn: Connection) -> None:
    batch(conn, 0, tenant_id=tenant(conn), running=5)
    assert admit(conn, max_in_flight=100) == []
    assert admission.queued_batches(conn) == []


def test_dispatch_publishes_each_job_at_its_batchs_broker_priority(conn: Connection) -> None:
    low = batch(conn, 2, priority=0)
    high = batch(conn, 2, priority=9)
    handoffs = dispatch(conn, max_in_flight=100)
    jobs = dict(conn.execute(text("SELECT id, batch_id FROM jobs WHERE batch_id IN (:a, :b)"),
                             {"a": low, "b": high}).all())
    assert sorted((jobs[h.job_id], h.priority) for h in handoffs) == [(low, 8), (low, 8), (high, 0), (high, 0)]
    # A stage published again (the sweeper, refeed) gets its batch's priority; a shadow keeps its own.
    some = [Handoff("validate", handoffs[0].job_id, "validate"),
            Handoff("shadow", handoffs[0].job_id, "opus", priority=SHADOW_PRIORITY)]
    again = with_priorities(conn, some)
    assert again[0].priority == handoffs[0].priority and again[1].priority == SHADOW_PRIORITY


def test_each_broker_priority_has_a_redis_list_of_its_own(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from pipeline.queries.ops import PRIORITY_SEP, queue_depths, queue_lists
    from pipeline.settings import Settings
    from workers.base import publisher
    from workers.config import make_app

    monkeypatch.setenv("BROKER_URL", broker_url)
    app = make_app(Settings())
    queue = f"priority-test-{next(_names)}"
    client = redis.Redis.from_url(broker_url)
    try:
        # Batch priorities 9, 5 and 4: kombu's default steps would fold the last two into one list.
        publisher(app)([Handoff("work", 1, queue, priority=message_priority(9)),
                        Handoff("work", 2, queue, priority=message_priority(5)),
                        Handoff("work", 3, queue, priority=message_priority(4))])
        assert [client.llen(k) for k in (queue, f"{queue}{PRIORITY_SEP}4", f"{queue}{PRIORITY_SEP}5")] == [1, 1, 1]
        assert queue_depths(client, [queue]) == {queue: 3}  # `status` counts every level's list
    finally:
        client.delete(*queue_lists(queue))
