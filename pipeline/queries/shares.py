"""Each tenant's share of the jobs in flight, and what it has waiting: what `switchyard status` and
`switchyard batches` show of the dispatcher's round robin (pipeline.flow.admission). Both reads are
bounded: the jobs in a stage (at most ``max_in_flight``), and the batches with queued jobs, found by
the admission's own loose index scan, never the queued jobs themselves."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from pipeline.db import Executor
from pipeline.flow.admission import groups, queued_batches
from pipeline.models import ACTIVE, Batch, Job, Tenant

OPERATOR = "(operator)"  # the batches enqueued from the CLI without --tenant, which count as one tenant


@dataclass
class TenantShare:
    tenant: str
    weight: float
    in_flight: int
    share: float  # of every job in a stage now, 0-1
    # The priorities of its batches with queued jobs, highest first (one entry per batch).
    waiting: list[int] = field(default_factory=list)


def tenant_shares(session: Executor) -> list[TenantShare]:
    """Every tenant with jobs in a stage or queued, the most in flight first."""
    in_flight: dict[int | None, int] = dict(session.execute(  # type: ignore[arg-type]
        select(Batch.tenant_id, func.count()).select_from(Job).join(Batch, Batch.id == Job.batch_id)
        .where(Job.status.in_(ACTIVE)).group_by(Batch.tenant_id)).all())
    waiting: dict[int | None, list[int]] = {}
    for g in groups(session, queued_batches(session)):
        waiting.setdefault(g.tenant_id, []).append(g.priority)
    keys = set(in_flight) | set(waiting)
    named = {r.id: (r.name, r.weight) for r in session.execute(
        select(Tenant.id, Tenant.name, Tenant.weight).where(Tenant.id.in_([k for k in keys if k is not None])))}
    total = sum(in_flight.values())
    out = [TenantShare(tenant=named[k][0] if k is not None else OPERATOR,
                       weight=named[k][1] if k is not None else 1.0, in_flight=in_flight.get(k, 0),
                       share=in_flight.get(k, 0) / total if total else 0.0,
                       waiting=sorted(waiting.get(k, []), reverse=True))
           for k in keys if k is None or k in named]
    return sorted(out, key=lambda t: (-t.in_flight, t.tenant))


def describe(shares: list[TenantShare]) -> str:
    """One line: "in flight now: a 62% (124), b 38% (76)"."""
    busy = [t for t in shares if t.in_flight]
    if not busy:
        return "in flight now: none"
    return "in flight now: " + ", ".join(f"{t.tenant} {100 * t.share:.0f}% ({t.in_flight:,})" for t in busy)
