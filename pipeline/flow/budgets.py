"""Budgets that cannot be overrun: a batch's spending cap and a tenant's daily limit, held at call time.

A gateway that checks a budget against what has been spent so far lets every concurrent request
pass the check, and the cap is overrun by as many calls as are in flight. Here each model call of a
job's stages first *reserves* its worst-case cost (``worst_case``: its input, bounded from above,
and its whole ``max_tokens`` of output, at its tier's price, cache writes at their price) against
every budget that covers it, in one transaction on Postgres:

- the batch's row and the tenant's row for today (``tenant_spend_days``) are locked, in that order
  (always the same order, so two reservations never deadlock);
- a budget has room when ``spent + reserved + amount <= limit``, where ``reserved`` is the sum of
  its open ``budget_reservations`` rows (one per call in flight, so the sum reads an index of a few
  hundred rows at most);
- if every budget has room, the reservation row is written, keyed by the call's id; if one has not,
  no call is made: the job moves to ``paused`` (reason "budget", not failed), with the amount it
  needs, and its started call row is dropped.

When the call's result is recorded, the same statement (states.Also, from stages._call_writes)
closes the reservation with the actual cost and adds that cost to the budgets' ``spent``. A failed
attempt is not billed (pricing: only an answered attempt costs), so the SDK's and our retries inside
one call stay within its one reservation. A call whose worker dies is marked "abandoned" (the
sweeper, or the next claim of the stage), and ``release_abandoned`` closes its reservation.

Exactly once, by construction: a reservation counts while ``released_at`` is NULL, so closing it is
setting one column, and a second close (the sweeper, then a late result) changes no sum; the spent
counters are added to only by the statement that records the call, which runs once (stages:
_applied_before). So the sum of the actual costs of a batch's calls never exceeds its budget, nor a
tenant's calls of a day its daily limit, whatever the concurrency.

Paused jobs resume (``resume_due``, each dispatcher tick) as soon as what they need fits again: a
raised budget, the next UTC day for a daily limit, or reservations released by calls that cost less
than their worst case. ``resume_batch`` (`switchyard batches resume`) has them all moved back by
hand. Either way the dispatcher moves them and publishes their stage, as it does for every job.

An economy call (pipeline.flow.economy) reserves the same way before its stage writes its request;
the hold then waits with the request through its message batch, since the API bills when the batch
runs, and the stage that applies the answer closes it (``park``, ``adopt``, ``settle_request``
below). A budget therefore also covers every request in a message batch.

Shadow evaluation's calls (pipeline.flow.shadow) are evaluation cost, never part of a job's or a
batch's: they reserve against the tenant's daily limit only (``reserve_evaluation``), which covers
every call a tenant's work makes, and their actual cost is added to the day's spend. One that does
not fit pauses nothing (its job has its answer already): the shadow step waits and tries again.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, cast

from sqlalchemy import Connection, Table, delete, exists, func, insert, select, update

from pipeline import tenants
from pipeline.claude.pricing import MILLION
from pipeline.config import ModelConfig
from pipeline.db import Executor, insert_or_skip
from pipeline.errors import BudgetPaused, InvalidInput
from pipeline.flow.prompts import Prompt
from pipeline.flow.states import Also, transition, transition_many
from pipeline.models import (
    Batch,
    BudgetReservation,
    EconomyRequest,
    Job,
    JobStatus,
    ModelCall,
    Money,
    Tenant,
    TenantSpendDay,
    utcnow,
)

log = logging.getLogger(__name__)

_BATCHES, _DAYS = cast(Table, Batch.__table__), cast(Table, TenantSpendDay.__table__)
_HOLDS_TABLE = cast(Table, BudgetReservation.__table__)

PLACES = Decimal(1).scaleb(-(Money.scale or 0))
# Tokens the API adds around a prompt (the role markers): a few; this many is plenty.
FRAMING_TOKENS = 64
PAUSE_REASON = "budget"
STALE = "stale"


# -- the arithmetic ----------------------------------------------------------------------------------


def input_bound(system: str, user: str) -> int:
    """At least as many input tokens as the prompt can have: its UTF-8 bytes, since every token
    stands for one byte or more, plus the framing. The rate limiter's estimate (characters / 4) is
    a guess it corrects after the call; a budget needs a bound it can never be under."""
    return len(system.encode()) + len(user.encode()) + FRAMING_TOKENS


def worst_case(models: ModelConfig, tier: str, *, input_tokens: int, max_tokens: int, cached: bool) -> Decimal:
    """The most a call can cost: all its input at the input price (at the dearer cache-write price
    when it goes through a cached prefix, since any of it may be written), and all of ``max_tokens``
    at the output price; rounded up to the cent's millionth the costs are kept in."""
    cfg = models.tier(tier)
    per_in = cfg.input_per_mtok / MILLION
    if cached:
        per_in *= max(Decimal(1), models.cache_write_multiplier, models.cache_write_1h_multiplier)
    total = input_tokens * per_in + max_tokens * cfg.output_per_mtok / MILLION
    return total.quantize(PLACES, rounding=ROUND_CEILING)


def room(limit: Decimal | None, *, spent: Decimal, reserved: Decimal) -> Decimal | None:
    """What a budget can still reserve (never below 0); None: no limit."""
    return None if limit is None else max(Decimal(0), limit - spent - reserved)


def fits(limit: Decimal | None, *, spent: Decimal, reserved: Decimal, amount: Decimal) -> bool:
    return limit is None or spent + reserved + amount <= limit


def check_budget(value: Any, *, where: str = "--budget-usd") -> Decimal:
    """A budget as given by a user (text or a number): a finite number of dollars, 0 or more, kept
    to the places costs are stored in. One sentence naming ``where`` otherwise."""
    try:
        amount = Decimal(str(value).strip())
    except ArithmeticError:
        raise InvalidInput(f"{where} {str(value)!r} is not a number of dollars") from None
    if not amount.is_finite():
        raise InvalidInput(f"{where} {str(value)!r} is not a number of dollars")
    if amount < 0:
        raise InvalidInput(f"{where} must be 0 or more, not {amount}")
    if amount >= tenants.SPEND_CEILING:
        raise InvalidInput(f"{where} must be under ${tenants.SPEND_CEILING:,f}")
    if amount != amount.quantize(PLACES):
        raise InvalidInput(f"{where} {amount} has more than {Money.scale} decimal places")
    return abs(amount)  # abs: -0 is 0


# -- reserving, in the worker --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """A call's open reservation, as the worker that made it knows it."""

    id: int
    amount: Decimal
    batch_id: int | None
    day_id: int | None


@dataclass(frozen=True)
class Shortfall:
    """Why a call did not fit: which budget, what it needed and what room there was."""

    budget: str  # "batch" | "tenant"
    need: Decimal
    room: Decimal

    def __str__(self) -> str:
        which = "the batch's budget" if self.budget == "batch" else "the tenant's daily limit"
        return f"paused: a call needs up to ${self.need:f}, {which} has ${self.room:f} left"


# The open hold of each call this process is making, by call id: the stage that records the call's
# result (stages._call_writes) takes it, to close it in the same statement.
_HOLDS: dict[int, Hold] = {}


def take(call_id: int) -> Hold | None:
    return _HOLDS.pop(call_id, None)


def settle_writes(hold: Hold | None, cost: Decimal) -> list[Also]:
    """The writes that replace a call's reservation with its actual cost, joined to the statement
    that records the call's result (whether or not that moves the job: the call was paid)."""
    if hold is None:
        return []
    writes = [Also(_HOLDS_TABLE, row_id=hold.id, values={"released_at": utcnow(), "cost_usd": cost}, when="always")]
    if hold.batch_id is not None:
        writes.append(Also(_BATCHES, row_id=hold.batch_id, add={"budget_spent_usd": cost}, when="always"))
    if hold.day_id is not None:
        writes.append(Also(_DAYS, row_id=hold.day_id, add={"spent_usd": cost}, when="always"))
    return writes


def _open_sum(session: Connection, column: Any, value: int) -> Decimal:
    return Decimal(session.scalar(select(func.coalesce(func.sum(BudgetReservation.amount_usd), 0))
                                  .where(column == value, BudgetReservation.released_at.is_(None))) or 0)


def _day_row(session: Connection, tenant_id: int, day: date, now: datetime) -> tuple[int, Decimal]:
    """Today's spend row of the tenant, locked; made on first use with what the tenant's calls have
    cost so far today (calls made before any reserved against this row)."""
    found = select(TenantSpendDay.id, TenantSpendDay.spent_usd).where(TenantSpendDay.tenant_id == tenant_id,
                                                                        TenantSpendDay.day == day)
    row = session.execute(found.with_for_update()).first()
    if row is None:
        already = tenants.spend_today(session, tenant_id, now=now)
        session.execute(insert_or_skip(session, TenantSpendDay).values(tenant_id=tenant_id, day=day, spent_usd=already)
                        .on_conflict_do_nothing())
        row = session.execute(found.with_for_update()).one()
    return int(row.id), Decimal(row.spent_usd)


def reserve(session: Connection, *, job_id: int, version: int, call_id: int, amount: Decimal,
            now: datetime | None = None) -> Hold | Shortfall | str | None:
    """Reserve ``amount`` for the call against every budget covering the job, or pause the job.

    Returns the Hold; None when no budget covers the job (nothing written); STALE when the job is
    no longer at ``version`` (nothing written: the caller makes no call, since a call of a job that
    moved on would be paid for and counted nowhere); a Shortfall when it did not fit, with the job
    paused and its call row dropped in this same transaction."""
    now = now or utcnow()
    job = session.execute(
        select(Job.status, Job.version, Job.batch_id, Batch.budget_usd, Batch.tenant_id,
               Tenant.max_spend_per_day_usd)
        .join(Batch, Batch.id == Job.batch_id).outerjoin(Tenant, Tenant.id == Batch.tenant_id)
        .where(Job.id == job_id)).first()
    if job is None or (job.budget_usd is None and job.max_spend_per_day_usd is None):
        return None
    if job.version != version:
        return STALE
    shortfall: Shortfall | None = None
    batch_id: int | None = None
    day_id: int | None = None
    if job.budget_usd is not None:
        # The lock makes the batch's reservations take turns: each sees the others' rows.
        b = session.execute(select(Batch.budget_usd, Batch.budget_spent_usd).where(Batch.id == job.batch_id)
                            .with_for_update(key_share=True)).one()
        reserved = _open_sum(session, BudgetReservation.batch_id, job.batch_id)
        if b.budget_usd is not None:
            batch_id = job.batch_id
            if not fits(b.budget_usd, spent=b.budget_spent_usd, reserved=reserved, amount=amount):
                shortfall = Shortfall("batch", amount, room(b.budget_usd, spent=b.budget_spent_usd,
                                                            reserved=reserved) or Decimal(0))
    if shortfall is None and job.max_spend_per_day_usd is not None:
        day_id, spent = _day_row(session, job.tenant_id, now.date(), now)
        # Read again under the day's lock: a limit lowered meanwhile holds from this call on.
        limit = session.scalar(select(Tenant.max_spend_per_day_usd).where(Tenant.id == job.tenant_id))
        reserved = _open_sum(session, BudgetReservation.day_id, day_id)
        if not fits(limit, spent=spent, reserved=reserved, amount=amount):
            shortfall = Shortfall("tenant", amount, room(limit, spent=spent, reserved=reserved) or Decimal(0))
    if shortfall is not None:
        pause(session, job_id, frm=JobStatus(job.status), version=version, need=amount, detail=str(shortfall))
        session.execute(delete(ModelCall).where(ModelCall.id == call_id))
        return shortfall
    hold_id = session.execute(insert(BudgetReservation).values(
        call_id=call_id, job_id=job_id, batch_id=batch_id, day_id=day_id, amount_usd=amount, created_at=now,
    ).returning(BudgetReservation.id)).scalar_one()
    return Hold(hold_id, amount, batch_id, day_id)


def reserve_evaluation(session: Connection, *, job_id: int, call_id: int, amount: Decimal,
                       now: datetime | None = None) -> Hold | Shortfall | None:
    """Reserve a shadow evaluation's call against its tenant's daily limit: the limit covers every
    call a tenant's work makes. Never against the batch's budget, which covers the jobs' own calls
    (evaluation cost is never a job's or a batch's). None when the tenant has no daily limit; a
    Shortfall, with nothing written and nothing paused, when it has no room."""
    now = now or utcnow()
    job = session.execute(select(Batch.tenant_id, Tenant.max_spend_per_day_usd).select_from(Job)
                          .join(Batch, Batch.id == Job.batch_id).outerjoin(Tenant, Tenant.id == Batch.tenant_id)
                          .where(Job.id == job_id)).first()
    if job is None or job.max_spend_per_day_usd is None:
        return None
    day_id, spent = _day_row(session, job.tenant_id, now.date(), now)
    limit = session.scalar(select(Tenant.max_spend_per_day_usd).where(Tenant.id == job.tenant_id))
    reserved = _open_sum(session, BudgetReservation.day_id, day_id)
    if not fits(limit, spent=spent, reserved=reserved, amount=amount):
        return Shortfall("tenant", amount, room(limit, spent=spent, reserved=reserved) or Decimal(0))
    hold_id = session.execute(insert(BudgetReservation).values(
        call_id=call_id, job_id=job_id, batch_id=None, day_id=day_id, amount_usd=amount, created_at=now,
    ).returning(BudgetReservation.id)).scalar_one()
    return Hold(hold_id, amount, None, day_id)


def pause(session: Executor, job_id: int, *, frm: JobStatus, version: int, need: Decimal, detail: str) -> bool:
    return transition(session, job_id, frm=frm, version=version, to=JobStatus.PAUSED, detail=detail,
                      paused_reason=PAUSE_REASON, paused_from=frm.value, paused_need_usd=need)


def hold_call(p: Any, *, job_id: int, version: int, call_id: int, tier: str, prompt: Prompt,
              max_tokens: int, economy_purpose: str | None = None, evaluation: bool = False) -> BudgetPaused | None:
    """The stage's hook before a call (stages._call): reserve, and remember the hold for the call's
    record. A BudgetPaused when the call must not be made. ``p``: the stage's Pipeline.
    ``economy_purpose``: the job is in economy mode, and this stage's call (of that purpose) may
    already hold a reservation through its request (``adopt``). ``evaluation``: a shadow
    evaluation's call (``reserve_evaluation``), which pauses nothing: its caller waits instead."""
    # A JSON Schema sent for structured outputs is input the API reads too.
    schema = json.dumps(prompt.output_schema) if prompt.output_schema is not None else ""
    amount = worst_case(p.models, tier, input_tokens=input_bound(prompt.system, prompt.user + schema),
                        max_tokens=max_tokens, cached=prompt.cache)

    def hold(session: Connection) -> Hold | Shortfall | str | None:
        if economy_purpose is not None:
            adopted = adopt(session, job_id=job_id, version=version, purpose=economy_purpose, call_id=call_id)
            if adopted is not None:
                return adopted
        if evaluation:
            return reserve_evaluation(session, job_id=job_id, call_id=call_id, amount=amount)
        return reserve(session, job_id=job_id, version=version, call_id=call_id, amount=amount)

    outcome = p.run(hold)
    if isinstance(outcome, Hold):
        _HOLDS[call_id] = outcome
        return None
    if isinstance(outcome, Shortfall):
        log.info("job %s: %s", job_id, outcome)
        return BudgetPaused(tier, outcome)
    return BudgetPaused(tier, None) if outcome == STALE else None


# -- economy calls: a hold that waits with its request ------------------------------------------------
#
# An economy call is paid when its message batch runs, not while its stage holds the job: the stage
# writes the request and hands the job back (its call row dropped), and a later run of the stage
# applies the answer. So the reservation made before the request was written moves to the request
# (``call_id`` NULL, ``economy_request_id`` set) in the statement that writes it, and counts against
# the budgets for as long as the request waits, is submitted and runs. The stage that applies the
# answer takes it back (``adopt``) and closes it with the actual cost, as for a synchronous call. A
# request that is never submitted (its job moved on) releases its hold; an answer for a job that
# moved on closes it with the answer's cost (``settle_request``).


def park(session: Executor, *, call_id: int, request_id: int) -> None:
    """The call's open hold now waits with its economy request (written in this transaction)."""
    session.execute(update(BudgetReservation).where(BudgetReservation.call_id == call_id,
                                                    BudgetReservation.released_at.is_(None))
                    .values(call_id=None, economy_request_id=request_id)
                    .execution_options(synchronize_session=False))


def adopt(session: Executor, *, job_id: int, version: int, purpose: str, call_id: int) -> Hold | None:
    """The open hold of the job's answered, unread request for this stage's call, taken over by
    ``call_id``: the call that applies its answer (or writes the request again) closes or moves it.
    A request still waiting keeps its hold: a stray run of the stage that finds it so hands its job
    back, and its call row (with whatever it holds) is dropped."""
    latest = (select(EconomyRequest.id).where(EconomyRequest.job_id == job_id, EconomyRequest.job_version == version,
                                              EconomyRequest.purpose == purpose, EconomyRequest.state == "done",
                                              EconomyRequest.consumed_at.is_(None))
              .order_by(EconomyRequest.id.desc()).limit(1).scalar_subquery())
    row = session.execute(
        update(BudgetReservation).where(BudgetReservation.economy_request_id == latest,
                                        BudgetReservation.call_id.is_(None), BudgetReservation.released_at.is_(None))
        .values(call_id=call_id)
        .returning(BudgetReservation.id, BudgetReservation.amount_usd, BudgetReservation.batch_id,
                   BudgetReservation.day_id)
        .execution_options(synchronize_session=False)).first()
    return Hold(int(row.id), Decimal(row.amount_usd), row.batch_id, row.day_id) if row is not None else None


def settle_request(session: Executor, *, request_ids: list[int], cost: Decimal | None = None) -> int:
    """Close the holds of requests that no stage will apply: with the answer's ``cost`` added to the
    budgets (an answer paid for, its job moved on), or released (never submitted, or not billed)."""
    if not request_ids:
        return 0
    held = session.execute(
        update(BudgetReservation).where(BudgetReservation.economy_request_id.in_(request_ids),
                                        BudgetReservation.call_id.is_(None), BudgetReservation.released_at.is_(None))
        .values(released_at=utcnow(), cost_usd=cost)
        .returning(BudgetReservation.batch_id, BudgetReservation.day_id)
        .execution_options(synchronize_session=False)).all()
    if cost:
        for r in held:
            if r.batch_id is not None:
                session.execute(update(Batch).where(Batch.id == r.batch_id)
                                .values(budget_spent_usd=Batch.budget_spent_usd + cost))
            if r.day_id is not None:
                session.execute(update(TenantSpendDay).where(TenantSpendDay.id == r.day_id)
                                .values(spent_usd=TenantSpendDay.spent_usd + cost))
    return len(held)


# -- releasing and resuming, in the dispatcher ----------------------------------------------------------


def release_abandoned(session: Executor, *, now: datetime | None = None) -> int:
    """Close the open reservations of calls that will never report back (marked "abandoned": their
    worker died, and the sweeper or the stage's next claim said so). Once: a closed one is not open."""
    abandoned = exists(select(ModelCall.id).where(ModelCall.id == BudgetReservation.call_id,
                                                  ModelCall.outcome == "abandoned"))
    released = session.execute(update(BudgetReservation)
                               .where(BudgetReservation.released_at.is_(None), abandoned)
                               .values(released_at=now or utcnow())
                               .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
    if released:
        log.warning("budgets: released %d reservation(s) held by calls whose worker died", released)
    return int(released or 0)


@dataclass(frozen=True)
class Resumed:
    id: int
    status: JobStatus
    tier: str | None


def _move_back(session: Executor, rows: list[Any], detail: str) -> list[Resumed]:
    by_status: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        by_status[r.paused_from].append(r.id)
    out: list[Resumed] = []
    for status, ids in by_status.items():
        to = JobStatus(status)
        out += [Resumed(m.id, to, m.tier) for m in transition_many(
            session, ids, frm=JobStatus.PAUSED, to=to, detail=detail, paused_reason=None, paused_from=None,
            paused_need_usd=None)]
    return out


def _rooms(session: Executor, batch_ids: set[int], tenant_ids: set[int], today: date
           ) -> tuple[dict[int, Decimal | None], dict[int, Decimal | None]]:
    """What each batch's budget and each tenant's limit for today can still reserve."""
    batch_room: dict[int, Decimal | None] = {}
    for b in session.execute(select(Batch.id, Batch.budget_usd, Batch.budget_spent_usd)
                             .where(Batch.id.in_(batch_ids))):
        reserved = Decimal(session.scalar(select(func.coalesce(func.sum(BudgetReservation.amount_usd), 0)).where(
            BudgetReservation.batch_id == b.id, BudgetReservation.released_at.is_(None))) or 0)
        batch_room[b.id] = room(b.budget_usd, spent=b.budget_spent_usd, reserved=reserved)
    tenant_room: dict[int, Decimal | None] = {}
    for t in session.execute(select(Tenant.id, Tenant.max_spend_per_day_usd).where(Tenant.id.in_(tenant_ids))):
        day = session.execute(select(TenantSpendDay.id, TenantSpendDay.spent_usd)
                              .where(TenantSpendDay.tenant_id == t.id, TenantSpendDay.day == today)).first()
        if day is None:  # no call reserved today yet: the day starts from what was spent without
            spent, reserved = tenants.spend_today(session, t.id), Decimal(0)
        else:
            spent = Decimal(day.spent_usd)
            reserved = Decimal(session.scalar(select(func.coalesce(func.sum(BudgetReservation.amount_usd), 0))
                                              .where(BudgetReservation.day_id == day.id,
                                                     BudgetReservation.released_at.is_(None))) or 0)
        tenant_room[t.id] = room(t.max_spend_per_day_usd, spent=spent, reserved=reserved)
    return batch_room, tenant_room


def resume_due(session: Executor, *, now: datetime | None = None, limit: int = 1000) -> list[Resumed]:
    """Move paused jobs back to their stage while what each needs fits in its budgets' room (oldest
    first within a batch): after a budget was raised, at the next UTC day for a daily limit, and as
    calls in flight settle for less than they reserved. The resumed job reserves again before its
    call, so a room that shrank meanwhile pauses it again; what this adds is only that a job is not
    woken for nothing.

    Batch by batch, so that the paused jobs of a batch out of budget never stand in front of those
    of a batch with room. Finding the batches reads every paused job's row once a tick (through the
    status index): cheap for thousands, to watch for millions."""
    now = now or utcnow()
    waiting = session.execute(
        select(Job.batch_id, Batch.tenant_id, func.min(Job.paused_need_usd).label("least"))
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.status == JobStatus.PAUSED, Job.paused_reason == PAUSE_REASON)
        .group_by(Job.batch_id, Batch.tenant_id)).all()
    if not waiting:
        return []
    batch_room, tenant_room = _rooms(session, {w.batch_id for w in waiting},
                                     {w.tenant_id for w in waiting if w.tenant_id is not None}, now.date())

    def fits_room(batch_id: int, tenant_id: int | None, need: Decimal) -> bool:
        b = batch_room.get(batch_id)
        t = tenant_room.get(tenant_id) if tenant_id is not None else None
        return (b is None or b >= need) and (t is None or t >= need)

    chosen: list[Any] = []
    for w in waiting:
        if len(chosen) >= limit or not fits_room(w.batch_id, w.tenant_id, Decimal(w.least or 0)):
            continue
        rows = session.execute(
            select(Job.id, Job.paused_from, Job.paused_need_usd)
            .where(Job.batch_id == w.batch_id, Job.status == JobStatus.PAUSED, Job.paused_reason == PAUSE_REASON)
            .order_by(Job.id).limit(limit - len(chosen)).with_for_update(skip_locked=True)).all()
        for r in rows:
            need = Decimal(r.paused_need_usd or 0)
            if not fits_room(w.batch_id, w.tenant_id, need):
                continue
            if batch_room.get(w.batch_id) is not None:
                batch_room[w.batch_id] = cast(Decimal, batch_room[w.batch_id]) - need
            if w.tenant_id is not None and tenant_room.get(w.tenant_id) is not None:
                tenant_room[w.tenant_id] = cast(Decimal, tenant_room[w.tenant_id]) - need
            chosen.append(r)
    return _move_back(session, chosen, "resumed: its budget has room")


# -- the operator's verbs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetState:
    batch_id: int
    batch: str
    budget_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal
    paused: int

    @property
    def exhausted(self) -> bool:
        """Jobs wait for room that the calls in flight will not give back."""
        return self.budget_usd is not None and self.paused > 0

    def as_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "batch": self.batch, "budget_usd": self.budget_usd,
                "spent_usd": self.spent_usd, "reserved_usd": self.reserved_usd, "paused": self.paused,
                "exhausted": self.exhausted}


def states(session: Executor, batch_ids: list[int]) -> dict[int, BudgetState]:
    """Each batch's budget, spent, reserved and paused jobs."""
    if not batch_ids:
        return {}
    reserved: dict[int, Any] = dict(session.execute(
        select(BudgetReservation.batch_id, func.sum(BudgetReservation.amount_usd))
        .where(BudgetReservation.batch_id.in_(batch_ids), BudgetReservation.released_at.is_(None))
        .group_by(BudgetReservation.batch_id)).all())  # type: ignore[arg-type]
    paused: dict[int, Any] = dict(session.execute(
        select(Job.batch_id, func.count()).where(Job.batch_id.in_(batch_ids), Job.status == JobStatus.PAUSED)
        .group_by(Job.batch_id)).all())  # type: ignore[arg-type]
    return {b.id: BudgetState(b.id, b.name, b.budget_usd, Decimal(b.budget_spent_usd),
                              Decimal(reserved.get(b.id) or 0), int(paused.get(b.id, 0)))
            for b in session.execute(select(Batch.id, Batch.name, Batch.budget_usd, Batch.budget_spent_usd)
                                     .where(Batch.id.in_(batch_ids)))}


@dataclass(frozen=True)
class Overview:
    """Budgets across every batch and tenant, for `switchyard status` and /metrics (no names)."""

    reserved_usd: Decimal  # held by the calls in flight
    calls_reserved: int  # calls in flight holding a reservation
    paused: int  # jobs paused for a budget
    exhausted_batches: int  # batches with a budget and jobs paused for it


def overview(session: Executor) -> Overview:
    held = session.execute(select(func.count(), func.coalesce(func.sum(BudgetReservation.amount_usd), 0))
                           .where(BudgetReservation.released_at.is_(None))).one()
    paused = session.execute(select(func.count(), func.count(func.distinct(Job.batch_id)))
                             .where(Job.status == JobStatus.PAUSED)).one()
    return Overview(Decimal(held[1]), int(held[0]), int(paused[0]), int(paused[1]))


def batch_job_spend(session: Executor, batch_id: int) -> Decimal:
    """What the batch's jobs have cost so far (their calls', shadow evaluation's excluded)."""
    return Decimal(session.scalar(select(func.coalesce(func.sum(Job.cost_usd), 0))
                                  .where(Job.batch_id == batch_id)) or 0)


def set_budget(session: Executor, batch_id: int, usd: Decimal | None) -> None:
    """Set (or, with None, remove) the batch's budget. A batch getting its first budget starts its
    spent counter at what its jobs have cost so far; from then on each call's record adds to it.
    Jobs paused for it resume when the dispatcher next sees room (``resume_due``)."""
    had = session.execute(select(Batch.budget_usd).where(Batch.id == batch_id).with_for_update()).scalar_one_or_none()
    values: dict[str, Any] = {"budget_usd": usd}
    if had is None and usd is not None:
        values["budget_spent_usd"] = batch_job_spend(session, batch_id)
    session.execute(update(Batch).where(Batch.id == batch_id).values(**values))


def resume_batch(session: Executor, batch_id: int, name: str) -> int:
    """Have every paused job of the batch resumed, whatever the room, at the dispatcher's next tick
    (which publishes them: a job moved back here would have no message until the sweeper's long
    deadline). A job that still does not fit pauses again at its next call. Refused, changing
    nothing, if none is paused. How many will resume."""
    n = session.execute(update(Job).where(Job.batch_id == batch_id, Job.status == JobStatus.PAUSED)
                        .values(paused_need_usd=0).execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
    if not n:
        raise InvalidInput(f"batch {name!r} has no paused jobs, so there is nothing to resume")
    return int(n)
