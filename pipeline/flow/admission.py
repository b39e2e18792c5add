"""Which queued jobs the dispatcher admits next: by priority, then round robin across tenants, then
across a tenant's batches.

Each round the dispatcher has free places: for a priority, ``max_in_flight`` less the jobs in a stage
at that priority or above (so a backlog's jobs already in the stages never hold an urgent batch
back). They go to the highest priority with queued jobs first; only when its batches run out of
queued jobs does the next priority get the rest. Within a priority, each place goes to the tenant with the fewest
jobs in flight at that priority for its weight (``tenants.weight``; the operator's own batches, from
the CLI without ``--tenant``, count as one tenant of weight 1), and within that tenant to its batch
with the fewest jobs in flight, the older batch on a tie. Counting what is in flight rather than
remembering whose turn it was keeps the policy stateless: Postgres is the only record, any number
of dispatchers agree, and a place freed one at a time still goes to whoever is furthest below its
share. Over the places of many rounds it is round robin (weighted): a 500,000-job batch holds half
the places beside one other tenant's batch, and all of them once that batch has drained.

The policy (``allocate``) is a plain function. Reading it from Postgres (``admit``) stays on indexes
whatever the backlog: the batches with queued jobs come from a loose index scan of
``ix_jobs_queued_batch_id`` (one index descent per such batch, not a read of the queued jobs), the
jobs in flight per batch from ``ix_jobs_batch_id_status_id``, and each batch's share from the same
partial index, its oldest first, ``LIMIT`` its share: a round reads about ``room`` jobs, never the
backlog.

The broker carries the priority too (``message_priority``): kombu's Redis transport keeps a list per
priority level and a worker pops them in order, so a stage of an urgent batch is taken before the
bulk messages already waiting in its queue.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, text

from pipeline.db import Executor, dialect_name
from pipeline.errors import InvalidInput
from pipeline.models import ACTIVE, Batch, Job, JobStatus, Tenant, utcnow
from pipeline.names import quoted

MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 5

# The Redis transport's priority levels (``broker_transport_options["priority_steps"]``): one list per
# level, 0 popped first. kombu's default has four (0, 3, 6, 9), which would fold the ten batch
# priorities into four; every level has its own list here.
BROKER_PRIORITY_STEPS = tuple(range(10))
# The last level is shadow evaluation's (pipeline.flow.stages.SHADOW_PRIORITY): it runs only when no
# job's stage waits, so no job's message goes there.
LAST_BROKER_PRIORITY = BROKER_PRIORITY_STEPS[-1]


def valid_priority(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and MIN_PRIORITY <= value <= MAX_PRIORITY


def check_priority(value: object, *, what: str = "the priority") -> int:
    if not valid_priority(value):
        raise InvalidInput(f"{what} must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} ({MAX_PRIORITY} is "
                           f"admitted first, {DEFAULT_PRIORITY} by default), not {quoted(value)}")
    return value  # type: ignore[return-value]


def message_priority(priority: int) -> int:
    """The broker priority of a job's messages for its batch's priority: 9 (admitted first) goes to
    level 0 (popped first), 8 to 1, ... and 1 and 0 share level 8, the last before the shadows'."""
    return min(MAX_PRIORITY - priority, LAST_BROKER_PRIORITY - 1)


# -- the policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A batch with queued jobs, as the policy sees it."""

    batch_id: int
    priority: int
    tenant_id: int | None  # None: the operator's own batches, which count as one tenant
    weight: float = 1.0
    in_flight: int = 0  # its jobs in a stage now
    # Queued jobs it can still give; None: at least as many as the room (not counted, since
    # counting a large batch's backlog is what this module avoids).
    available: int | None = None


def allocate(room: int, groups: Iterable[Group], *, level_room: Mapping[int, int] | None = None) -> dict[int, int]:
    """How many jobs of each batch to admit into ``room`` places (batch id -> jobs; none listed for
    a batch that gets nothing). One place at a time: the highest priority first; within it, the
    tenant with the fewest jobs in flight for its weight (counting what this round gives), the one
    with the older batch on a tie; within the tenant, its batch with the fewest in flight, the older
    on a tie. A batch gives no more than it has ``available``.

    ``level_room``: the most that priority p and those above it may take this round, together
    (``admit`` passes max_in_flight less the jobs in flight at p or above)."""
    out: dict[int, int] = {}
    levels: dict[int, list[Group]] = defaultdict(list)
    for g in groups:
        if g.available is None or g.available > 0:
            levels[g.priority].append(g)
    given = 0  # this round, at the levels done so far (all above the next)
    for priority in sorted(levels, reverse=True):
        cap = room if level_room is None else min(room, level_room[priority] - given)
        if cap <= 0:
            continue
        used = cap - _round_robin(cap, levels[priority], out)
        room -= used
        given += used
    return out


def _round_robin(room: int, groups: Sequence[Group], out: dict[int, int]) -> int:
    by_tenant: dict[int | None, list[Group]] = defaultdict(list)
    for g in groups:
        by_tenant[g.tenant_id].append(g)
    tenants: list[tuple[float, int, int | None]] = []  # (in flight / weight, oldest batch, tenant)
    batches: dict[int | None, list[tuple[int, int]]] = {}  # tenant -> heap of (in flight, batch id)
    load: dict[int | None, int] = {}
    weight: dict[int | None, float] = {}
    left: dict[int, int | None] = {}
    for tenant, mine in by_tenant.items():
        load[tenant] = sum(g.in_flight for g in mine)
        weight[tenant] = max(mine[0].weight, 1e-9)
        batches[tenant] = [(g.in_flight, g.batch_id) for g in mine]
        heapq.heapify(batches[tenant])
        tenants.append((load[tenant] / weight[tenant], min(g.batch_id for g in mine), tenant))
        left.update({g.batch_id: g.available for g in mine})
    heapq.heapify(tenants)
    while room > 0 and tenants:
        if len(tenants) == 1 and len(batches[tenants[0][2]]) == 1:
            # One batch left at this priority: the rest of the room at once, not a place at a time.
            _, batch_id = batches[tenants[0][2]][0]
            n = room if left[batch_id] is None else min(room, left[batch_id] or 0)
            out[batch_id] = out.get(batch_id, 0) + n
            return room - n
        _, oldest, tenant = heapq.heappop(tenants)
        in_flight, batch_id = heapq.heappop(batches[tenant])
        out[batch_id] = out.get(batch_id, 0) + 1
        room -= 1
        load[tenant] += 1
        remaining = left[batch_id]
        if remaining is not None:
            left[batch_id] = remaining = remaining - 1
        if remaining is None or remaining > 0:
            heapq.heappush(batches[tenant], (in_flight + 1, batch_id))
        if batches[tenant]:
            heapq.heappush(tenants, (load[tenant] / weight[tenant], oldest, tenant))
    return room


# -- reading it from Postgres ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    id: int
    pinned_tier: str | None
    priority: int


# One index descent per batch with queued jobs: the next batch id above the last, in the partial
# index of queued jobs (Postgres reads a min() off the index's first entry). Postgres 15 has no
# skip scan: a DISTINCT would read every queued job. Written so that SQLite (the demo) runs it too.
_QUEUED_BATCHES = text("""
WITH RECURSIVE queued(batch_id) AS (
    SELECT min(batch_id) FROM jobs WHERE status = 'queued'
    UNION ALL
    SELECT (SELECT min(j.batch_id) FROM jobs j WHERE j.status = 'queued' AND j.batch_id > q.batch_id)
    FROM queued q WHERE q.batch_id IS NOT NULL
)
SELECT batch_id FROM queued WHERE batch_id IS NOT NULL LIMIT :most
""")
# More batches than this with queued jobs at once: the rest wait for a later round.
MAX_GROUPS = 10_000


def queued_batches(session: Executor) -> list[int]:
    return [int(b) for b in session.execute(_QUEUED_BATCHES, {"most": MAX_GROUPS}).scalars()]


def in_flight(now: datetime | None = None) -> ColumnElement[bool]:
    """A job in flight: in a stage, and not parked for an economy call's message batch (a parked
    job holds no message, thread or broker place, and can wait hours; counting it would let an
    economy batch's waiting jobs take every place, and its message batches would never be larger
    than max_in_flight). A parked job woken by its answer (not_before now) is in flight again."""
    return and_(Job.status.in_(ACTIVE),
                or_(Job.parked.is_(False), Job.not_before.is_(None), Job.not_before <= (now or utcnow())))


def groups(session: Executor, batch_ids: Sequence[int]) -> list[Group]:
    """The batches given, with their priority, tenant, weight and jobs in flight."""
    if not batch_ids:
        return []
    busy = dict(session.execute(  # type: ignore[arg-type]
        select(Job.batch_id, func.count()).where(Job.batch_id.in_(batch_ids), in_flight())
        .group_by(Job.batch_id)).all())
    rows = session.execute(select(Batch.id, Batch.priority, Batch.tenant_id, Tenant.weight)
                           .outerjoin(Tenant, Tenant.id == Batch.tenant_id).where(Batch.id.in_(batch_ids))).all()
    return [Group(r.id, r.priority, r.tenant_id, r.weight if r.weight is not None else 1.0, busy.get(r.id, 0))
            for r in rows]


def in_flight_by_priority(session: Executor) -> dict[int, int]:
    """Jobs in a stage now, by their batch's priority (reads the jobs in flight, never the queued)."""
    return dict(session.execute(  # type: ignore[arg-type]
        select(Batch.priority, func.count()).select_from(Job).join(Batch, Batch.id == Job.batch_id)
        .where(in_flight()).group_by(Batch.priority)).all())


def admit(session: Executor, *, max_in_flight: int, limit: int = 1000) -> list[Admitted]:
    """The queued jobs to admit now, at most ``limit``, by ``allocate``, locked (SKIP LOCKED: two
    dispatchers take disjoint sets). A batch that gives fewer than its share (it ran out, or another
    dispatcher holds its oldest) has its share handed to the others, in another bounded read.

    ``max_in_flight`` bounds, for each priority, the jobs in flight at that priority or above: lower
    priorities' jobs do not hold places against a higher one, so an urgent batch never waits for a
    backlog's jobs already in the stages to drain (its messages then pass theirs in the broker).
    While both are in flight the stages hold up to ``max_in_flight`` of each; the backlog gets no
    new place until it is under the bound again."""
    found = groups(session, queued_batches(session))
    if not found:
        return []
    busy = in_flight_by_priority(session)
    level_room = {p: max_in_flight - sum(n for q, n in busy.items() if q >= p) for p in {g.priority for g in found}}
    room = min(limit, max(level_room.values()))
    if room <= 0:
        return []
    priority = {g.batch_id: g.priority for g in found}
    taken: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
    # Each read that comes short marks at least one batch as run out, so this ends within a read
    # per batch; usually the first read fills the room.
    for _ in range(len(found) + 1):
        shares = allocate(room, found, level_room=level_room)
        wanted = {b: n - len(taken[b]) for b, n in shares.items() if n > len(taken[b])}
        if not wanted:
            break
        after = {b: taken[b][-1][0] if taken[b] else 0 for b in wanted}
        got = _oldest(session, wanted, after)
        short = False
        for b, n in wanted.items():
            taken[b] += got.get(b, [])
            if len(got.get(b, [])) < n:
                short = True
        if not short:
            break
        # Those that came short have given all they can: the next allocation knows it.
        found = [replace(g, available=len(taken[g.batch_id])) if len(got.get(g.batch_id, [])) < wanted.get(
            g.batch_id, 0) else g for g in found]
    return [Admitted(job_id, tier, priority[b]) for b, jobs in taken.items() for job_id, tier in jobs]


# One statement for every batch, its text fixed (the batches go as arrays): built from a VALUES list
# instead, SQLAlchemy compiled it anew each round, which cost more than Postgres ran it. The row
# comparison and the ORDER BY are the partial index's own columns: with ``id > after`` and ``ORDER
# BY id`` the planner walked the primary key from the start of the table, filtering every older
# batch's jobs out, because it takes a batch's jobs for spread evenly over the ids.
_OLDEST = text("""
SELECT w.batch_id, pick.id, pick.pinned_tier
FROM unnest(CAST(:batches AS bigint[]), CAST(:after AS bigint[]), CAST(:n AS integer[])) AS w(batch_id, after_id, n)
CROSS JOIN LATERAL (
    SELECT jobs.id, jobs.pinned_tier FROM jobs
    WHERE jobs.batch_id = w.batch_id AND jobs.status = 'queued' AND (jobs.batch_id, jobs.id) > (w.batch_id, w.after_id)
    ORDER BY jobs.batch_id, jobs.id LIMIT w.n
    FOR UPDATE SKIP LOCKED
) AS pick
ORDER BY w.batch_id, pick.id
""")


def _oldest(session: Executor, wanted: Mapping[int, int], after: Mapping[int, int]
            ) -> dict[int, list[tuple[int, str | None]]]:
    """Up to ``wanted[b]`` of batch b's oldest queued jobs past id ``after[b]``, in one statement on
    Postgres (a LATERAL read of the partial index per batch)."""
    out: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
    if dialect_name(session) == "postgresql":
        batches = list(wanted)
        rows = session.execute(_OLDEST, {"batches": batches, "after": [after[b] for b in batches],
                                         "n": [wanted[b] for b in batches]})
        for r in rows:
            out[r.batch_id].append((r.id, r.pinned_tier))
        return out
    for b, n in wanted.items():  # SQLite (the embedded demo): a statement per batch
        for r in session.execute(select(Job.id, Job.pinned_tier).where(
                Job.batch_id == b, Job.status == JobStatus.QUEUED, Job.id > after[b]).order_by(Job.id).limit(n)):
            out[b].append((r.id, r.pinned_tier))
    return out


def with_priorities(session: Executor, handoffs: Sequence[Any]) -> list[Any]:
    """``handoffs`` (pipeline.flow.stages.Handoff) with the broker priority of their job's batch
    where they have none: the stages the sweeper and refeed publish again keep their batch's place."""
    ids = [h.job_id for h in handoffs if h.priority is None]
    if not ids:
        return list(handoffs)
    found = dict(session.execute(select(Job.id, Batch.priority).join(Batch, Batch.id == Job.batch_id)
                                 .where(Job.id.in_(ids))).all())  # type: ignore[arg-type]
    return [replace(h, priority=message_priority(found[h.job_id])) if h.priority is None and h.job_id in found else h
            for h in handoffs]
