"""A job's story (pipeline.queries.history.get_job) as one list of moments in time order: routing
decisions, calls, verdicts and status changes interleaved, as the job page draws them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pipeline.queries.history import JobStory

# Which of several moments at the same instant comes first: a status change opens what follows.
_ORDER = {"status": 0, "route": 1, "call": 2, "verdict": 3}


@dataclass(frozen=True)
class Moment:
    at: datetime
    kind: str  # status | route | call | verdict
    title: str
    detail: str | None = None
    ok: bool | None = None  # a call's or verdict's outcome; None where it has none
    tier: str | None = None
    duration_ms: float | None = None
    cost: str | None = None

    def offset_s(self, start: datetime) -> float:
        return (self.at - start).total_seconds()


@dataclass(frozen=True)
class Span:
    """A call drawn as a bar on its tier's lane, in percent of the job's whole span."""

    tier: str
    left: float
    width: float
    ok: bool
    label: str


def lanes(story: JobStory, start: datetime, items: list[Moment]) -> tuple[float, dict[str, list[Span]]]:
    """The job's span in seconds, and its calls as bars per tier (in the order the tiers were first called)."""
    ends = [m.at.timestamp() + (m.duration_ms or 0) / 1000 for m in items]
    total = max([*ends, start.timestamp()]) - start.timestamp()
    out: dict[str, list[Span]] = {}
    for c in story.calls:
        begin = (c.started_at - start).total_seconds()
        took = (c.latency_ms or 0) / 1000
        out.setdefault(c.tier, []).append(Span(
            tier=c.tier, left=100 * begin / total if total else 0, width=max(0.6, 100 * took / total) if total else 100,
            ok=c.outcome == "ok", label=f"{c.stage} call, +{begin:.2f}s, {c.latency_ms or 0:.0f} ms, {c.outcome}"))
    return total, out


def moments(story: JobStory) -> list[Moment]:
    out: list[Moment] = []
    for e in story.events:
        out.append(Moment(at=e.at, kind="status", title=f"{e.from_status or 'new'} → {e.to_status}",
                          detail=e.detail))
    for r in story.routing:
        if r.reason_kind == "triage":
            conf = "" if r.confidence is None else f" (confidence {r.confidence:.2f})"
            title = f"triage verdict: {r.verdict or '-'}{conf} → {r.to_tier}"
        else:
            title = f"{r.reason_kind}: {r.from_tier or '-'} → {r.to_tier}"
        out.append(Moment(at=r.at, kind="route", title=title, detail=r.reason, tier=r.to_tier))
    for c in story.calls:
        what = f"{c.stage} call to {c.tier} ({c.model})"
        if c.attempt > 1 or c.delivery > 1:
            what += f", attempt {c.attempt}" + (f", delivery {c.delivery}" if c.delivery > 1 else "")
        tokens = f"{c.input_tokens} in / {c.output_tokens} out tokens"
        if c.cache_read_input_tokens or c.cache_creation_input_tokens:
            tokens += f", cache {c.cache_read_input_tokens} read / {c.cache_creation_input_tokens} written"
        detail = f"{c.outcome}: {tokens}"
        if c.error_type or c.error_message:
            detail += f" — {c.status_code or ''} {c.error_type or ''} {c.error_message or ''}".rstrip()
        out.append(Moment(at=c.started_at, kind="call", title=what, detail=detail, ok=c.outcome == "ok", tier=c.tier,
                          duration_ms=c.latency_ms, cost=f"{c.cost_usd:f}"))
    for v in story.validations:
        out.append(Moment(at=v.at, kind="verdict", title=f"{v.validator} check of {v.tier}'s answer (attempt "
                          f"{v.attempt}): {'ok' if v.ok else 'failed'}", detail="; ".join(v.problems) or None,
                          ok=v.ok, tier=v.tier))
    return sorted(out, key=lambda m: (m.at, _ORDER[m.kind]))
