"""Economy mode: a batch's model calls made through the Message Batches API, at the batch discount.

Economy is another way of obtaining a call's answer, not another pipeline: the same stages, state
machine and records. Shadow evaluation's steps (pipeline.flow.shadow) obtain theirs the same way,
keyed by the job's final version; they park and are woken on the shadow's row instead of the
job's. A stage of an economy job that needs a call (``obtain``):

- finds no request for it yet: writes one ("pending": the exact /v1/messages body the synchronous
  path would send, cache_control included) and hands its job back without counting a delivery,
  parked (``not_before`` an hour ahead, so neither the sweeper nor refeed touches it meanwhile);
- finds its request answered: applies the answer exactly as a synchronous one (the same tokens and
  cache tokens, the cost at the batch discount, the latency from submission to result, the message
  batch id on the call row), and marks the request consumed in the same statement as the move.

A request belongs to its job's *version*: a stage makes one call per version, and every transition
moves the version on, so a job moves through its stages in successive message batches.

The dispatcher's round (``Economy.tick``; no process of its own) does the rest:

- submits a model's pending requests as one message batch once there are ``max_requests`` of them
  or the oldest has waited ``max_age_s``. The batch is recorded in Postgres before the API is asked
  to create it ("creating", with the requests claimed by a conditional update that skips rows
  another dispatcher holds, so two dispatchers never submit the same call) and again after
  ("in_progress", with the API's id);
- polls every open batch each ``poll_interval_s``; an ended batch's results (in any order) are
  stored against their requests by custom_id, and each answered job is woken (``not_before`` set to
  now) for the dispatcher's refeed to publish;
- reconciles a batch left "creating" by a dispatcher killed mid-create, once it is older than
  ``create_timeout_s``: the API's batches created since then, not known here and of the same size,
  are taken to be it (its results then match by custom_id prefix ``sy<batch row>-``); if there is
  none, it was never created, and its requests go back to pending. Never both: no request is lost,
  none is paid twice;
- cancels the open batches whose requests all belong to cancelled jobs;
- records the answers that arrive for jobs that have moved on (cancelled meanwhile) as calls that
  were paid for but not applied.

Failures, per request: ``errored`` is a failed call (pipeline.claude.batches.outcome_of), retried
by the synchronous rules (a transient error waits, then goes in a later batch; a permanent one fails
the job); ``expired`` is resubmitted once, and a second expiry makes that call on the standard path,
noted on the job (``economy_note``); ``canceled`` follows the job (a cancelled job's stage never
runs again; a live job's request is made again).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, String, Table, and_, exists, func, insert, literal, or_, select, update
from sqlalchemy import cast as sql_cast

from pipeline.claude.batches import BatchClient, BatchInfo, outcome_of
from pipeline.claude.client import CallResult, message_params
from pipeline.claude.pricing import call_cost
from pipeline.config import EconomyConfig
from pipeline.errors import CallFailed, ClaudeError, Parked, PermanentClaudeError
from pipeline.flow import budgets
from pipeline.flow.admission import in_flight
from pipeline.models import (
    ACTIVE,
    OPEN_SHADOW,
    Batch,
    EconomyRequest,
    Job,
    JobStatus,
    MessageBatch,
    ModelCall,
    ShadowEvaluation,
    Stage,
    Task,
    utcnow,
)

if TYPE_CHECKING:
    from pipeline.flow.stages import Pipeline
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

STANDARD, ECONOMY = "standard", "economy"
MODES = (STANDARD, ECONOMY)
# A parked job waits this long at most for its wake-up: a safety net only (the dispatcher wakes it
# when its answer is stored). Past it, the stage runs again, finds its request still in a message
# batch, and parks again.
PARK_S = 3600.0
# A batch create that met a status error (429, 5xx: nothing was created) is tried again after this.
CREATE_BACKOFF_S = 5.0

_REQ = cast(Table, EconomyRequest.__table__)
_MB = cast(Table, MessageBatch.__table__)
_JOBS = cast(Table, Job.__table__)
_CALLS = cast(Table, ModelCall.__table__)
_SHADOWS = cast(Table, ShadowEvaluation.__table__)
# The purposes of shadow evaluation's calls (pipeline.flow.shadow): they belong to a job that has
# succeeded, and live as long as its shadow is open, not as long as the job is active.
EVALUATION = (Stage.SHADOW.value, Stage.JUDGE.value)


def _live() -> Any:
    """A request still wanted: a stage's call while its job is active at the request's version; an
    evaluation call while the job's shadow is open."""
    job_live = exists(select(_JOBS.c.id).where(_JOBS.c.id == _REQ.c.job_id, _JOBS.c.version == _REQ.c.job_version,
                                               _JOBS.c.status.in_(ACTIVE)))
    shadow_live = exists(select(_SHADOWS.c.id).where(_SHADOWS.c.job_id == _REQ.c.job_id,
                                                     _SHADOWS.c.status.in_(OPEN_SHADOW)))
    return or_(and_(_REQ.c.purpose.not_in(EVALUATION), job_live), and_(_REQ.c.purpose.in_(EVALUATION), shadow_live))


# -- the stage's side --------------------------------------------------------------------------------


def _aware(at: datetime) -> datetime:
    """A timestamp read back from the database, in UTC: SQLite (the embedded default) returns them
    without a zone."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _end_unanswered(conn: Connection, *, row_id: int) -> None:
    """End a message batch row, its requests still without an answer taken as expired."""
    now = utcnow()
    conn.execute(update(_REQ).where(_REQ.c.message_batch_id == row_id, _REQ.c.state == "submitted").values(
        state="done", result_type="expired", result={"type": "expired"}, result_at=now))
    conn.execute(update(_MB).where(_MB.c.id == row_id).values(state="ended", ended_at=now))


@dataclass(frozen=True)
class EconomyCall:
    """The call a stage of an economy job is about to make: its job, version and stage."""

    job_id: int
    version: int
    purpose: str  # Stage.value: triage | work | format_check
    call_id: int | None = None  # the stage's call row, whose budget hold the written request takes over


# (database, batch id, task id) -> (mode, read at): a batch's mode is read once a few seconds, not
# per stage (it changes only when an enqueue sets it).
_MODES: dict[tuple[str, int, int | None], tuple[str, float]] = {}
_MODE_TTL_S = 10.0


def mode_of(p: Pipeline, *, batch_id: int | None, task_id: int | None) -> str:
    """A job's mode: its batch's, else its task's default ``mode``, else standard."""
    if batch_id is None:
        return STANDARD
    key = (str(p.engine.url), batch_id, task_id)
    known = _MODES.get(key)
    if known is not None and time.monotonic() - known[1] < _MODE_TTL_S:
        return known[0]
    with p.engine.connect() as conn:
        mode = conn.scalar(select(Batch.mode).where(Batch.id == batch_id))
        if mode is None and task_id is not None:
            definition = conn.scalar(select(Task.definition).where(Task.id == task_id)) or {}
            mode = definition.get("mode")
    if len(_MODES) > 4096:
        _MODES.clear()
    _MODES[key] = (mode or STANDARD, time.monotonic())
    return mode or STANDARD


def economy_call(p: Pipeline, *, job_id: int, version: int, batch_id: int | None, task_id: int | None,
                 purpose: str, call_id: int | None = None) -> EconomyCall | None:
    """The EconomyCall for a stage's call if its job is in economy mode; None: the standard path."""
    if mode_of(p, batch_id=batch_id, task_id=task_id) != ECONOMY:
        return None
    return EconomyCall(job_id, version, purpose, call_id)


def obtain(p: Pipeline, call: EconomyCall, *, tier: str, model: str, system: str, user: str, max_tokens: int,
           cache_system: bool, cache_ttl: str, output_schema: dict[str, Any] | None
           ) -> CallResult | CallFailed | Parked | None:
    """The call's answer from its message batch (CallResult, or CallFailed for an errored request),
    or Parked (its request is written, or still in a batch), or None: make it on the standard path
    (its request expired twice)."""
    params = message_params(model=model, system=system, user=user, max_tokens=max_tokens,
                            cache_system=cache_system, cache_ttl=cache_ttl, output_schema=output_schema)

    def do(conn: Connection) -> CallResult | CallFailed | Parked | None:
        row = conn.execute(
            select(_REQ.c.id, _REQ.c.state, _REQ.c.round, _REQ.c.result_type, _REQ.c.result, _REQ.c.submitted_at,
                   _REQ.c.result_at, _REQ.c.consumed_at, _MB.c.api_id)
            .select_from(_REQ.outerjoin(_MB, _MB.c.id == _REQ.c.message_batch_id))
            .where(_REQ.c.job_id == call.job_id, _REQ.c.job_version == call.version, _REQ.c.purpose == call.purpose)
            .order_by(_REQ.c.id.desc()).limit(1)).first()
        if row is not None and row.consumed_at is None and row.state == "done":
            if row.result_type in ("succeeded", "errored"):
                # Consumed by the stage's own record of the call (stages._call_writes), in the
                # statement that applies it: a stage that dies before finds it again.
                return outcome_of(row.result or {}, submitted_at=row.submitted_at or row.result_at,
                                  result_at=row.result_at, message_batch_id=row.api_id, request_id=row.id)
            # expired or canceled: nothing was billed; mark it read, and decide what comes next.
            conn.execute(update(_REQ).where(_REQ.c.id == row.id).values(consumed_at=utcnow()))
            if row.result_type == "expired" and row.round >= 2:
                conn.execute(update(_JOBS).where(_JOBS.c.id == call.job_id).values(
                    economy_note=f"the {call.purpose} call's message batch request expired twice; it was made on "
                                 f"the standard path (at the standard price)"))
                return None
            _write(conn, call, tier, model, params, rnd=row.round + 1 if row.result_type == "expired" else row.round)
            return Parked(tier, PARK_S)
        if row is not None and row.consumed_at is None:
            return Parked(tier, PARK_S)  # still pending or in a message batch (a stray message ran the stage)
        if row is not None and row.result_type == "expired" and row.round >= 2:
            return None  # the standard call after a second expiry, tried again
        _write(conn, call, tier, model, params, rnd=1)
        return Parked(tier, PARK_S)

    return p.run(do)


def _write(conn: Connection, call: EconomyCall, tier: str, model: str, params: dict[str, Any], *, rnd: int) -> None:
    request_id = conn.execute(insert(_REQ).values(
        job_id=call.job_id, job_version=call.version, purpose=call.purpose, tier=tier, model=model, round=rnd,
        state="pending", params=params, created_at=utcnow()).returning(_REQ.c.id)).scalar_one()
    if call.call_id is not None:
        # The call's budget hold waits with the request: it is paid when its message batch runs.
        budgets.park(conn, call_id=call.call_id, request_id=request_id)


# -- the dispatcher's side ------------------------------------------------------------------------


def _custom_id(batch_row: int, request_id: int) -> str:
    return f"sy{batch_row}-{request_id}"


def _request_of(custom_id: str, batch_row: int) -> int | None:
    prefix = f"sy{batch_row}-"
    if not custom_id.startswith(prefix):
        return None
    try:
        return int(custom_id[len(prefix):])
    except ValueError:
        return None


class Economy:
    """Economy mode's part of the dispatcher's round (module doc). One per dispatcher process."""

    def __init__(self, p: Pipeline, client: BatchClient, config: EconomyConfig, *, kill_at: str | None = None,
                 max_in_flight: int | None = None) -> None:
        self.p = p
        self.client = client
        self.config = config
        self.max_in_flight = max_in_flight  # the dispatcher's: how many parked jobs a round may wake
        self._reconciled_at = 0.0
        self._backoff: dict[str, float] = {}
        # TEST HOOK (SWITCHYARD_TEST_ECONOMY_KILL="POINT=MARKER"): SIGKILL this process once at POINT
        # (after_create, while_polling), the marker file saying it already happened.
        self._kill_at = kill_at

    def _maybe_die(self, point: str) -> None:
        if not self._kill_at:
            return
        where, _, marker = self._kill_at.partition("=")
        if where != point or not marker or os.path.exists(marker):
            return
        with open(marker, "w") as fh:
            fh.write(point)
        log.critical("TEST HOOK: killing the dispatcher at %s (SWITCHYARD_TEST_ECONOMY_KILL)", point)
        os.kill(os.getpid(), signal.SIGKILL)

    def tick(self) -> None:
        """One round. An API error is logged and the next round tries that part again; the other
        parts go on (a batch that cannot be cancelled must not stop answers being woken)."""
        if not self._active():
            return
        due = time.monotonic() - self._reconciled_at >= self.config.create_timeout_s / 2
        if due and self._guarded(self.reconcile):
            self._reconciled_at = time.monotonic()
        for part in (self.drop_stale, self.submit_due, self.poll, self.cancel_abandoned, self.settle_orphans,
                     self.wake):
            self._guarded(part)

    def _active(self) -> bool:
        """Anything for the round to do: a request not yet read, or a message batch not yet ended.
        One read (two partial indexes) on a pipeline with no economy work, instead of the round's
        statements, several of them writes, every dispatcher tick."""
        return bool(self.p.run(lambda c: c.scalar(select(or_(
            exists(select(_REQ.c.id).where(_REQ.c.consumed_at.is_(None))),
            exists(select(_MB.c.id).where(_MB.c.state.in_(("creating", "in_progress")))))))))

    @staticmethod
    def _guarded(part: Any) -> bool:
        try:
            part()
        except ClaudeError as exc:
            log.warning("economy: the Message Batches API answered %s; trying again next round", exc)
            return False
        return True

    # -- submitting ------------------------------------------------------------------------------

    def drop_stale(self) -> None:
        """Pending requests whose job has moved on (cancelled), or whose shadow has ended, are never
        submitted."""

        def do(conn: Connection) -> None:
            dropped = conn.scalars(update(_REQ).where(_REQ.c.state == "pending", ~_live())
                                   .values(state="dropped", consumed_at=utcnow()).returning(_REQ.c.id)).all()
            budgets.settle_request(conn, request_ids=list(dropped))  # never paid: their holds go
        self.p.run(do)

    def submit_due(self) -> None:
        now = utcnow()
        rows = self.p.run(lambda c: c.execute(
            select(_REQ.c.model, func.count(), func.min(_REQ.c.created_at)).where(_REQ.c.state == "pending")
            .group_by(_REQ.c.model)).all(), autocommit=True)
        for model, n, oldest in rows:
            if self._backoff.get(model, 0.0) > time.monotonic():
                continue
            if n >= self.config.max_requests or (now - _aware(oldest)).total_seconds() >= self.config.max_age_s:
                self.submit(model)

    def submit(self, model: str) -> int:
        """Submit up to max_requests pending requests of ``model`` as one message batch; how many."""
        now = utcnow()

        def claim(conn: Connection) -> tuple[int, Sequence[Any]] | None:
            ids = conn.scalars(select(_REQ.c.id).where(_REQ.c.state == "pending", _REQ.c.model == model)
                               .order_by(_REQ.c.id).limit(self.config.max_requests)
                               .with_for_update(skip_locked=True)).all()
            if not ids:
                return None
            row_id = conn.execute(insert(_MB).values(model=model, state="creating", requests=len(ids), created_at=now)
                                  .returning(_MB.c.id)).scalar_one()
            rows = conn.execute(
                update(_REQ).where(_REQ.c.id.in_(ids), _REQ.c.state == "pending")
                .values(state="submitting", message_batch_id=row_id,
                        # ||, not concat(): SQLite (the embedded default) has concat() only from 3.44.
                        custom_id=literal(f"sy{row_id}-") + sql_cast(_REQ.c.id, String))
                .returning(_REQ.c.custom_id, _REQ.c.params)).all()
            return row_id, rows

        claimed = self.p.run(claim)
        if claimed is None:
            return 0
        row_id, rows = claimed
        requests = [{"custom_id": r.custom_id, "params": r.params} for r in rows]
        try:
            info = self.client.create(requests)
        except PermanentClaudeError as exc:
            # Refused as a whole (400, 413...): as a synchronous call refused so would, each call fails.
            log.error("economy: message batch of %d %s request(s) refused: %s", len(rows), model, exc)  # noqa: TRY400
            self._refused(row_id, exc)
            return 0
        except ClaudeError as exc:
            if exc.status is not None and exc.status not in (408, 504):
                # Answered with an error status (429, 529, 5xx): nothing was created. The requests
                # go back to pending.
                self._back_to_pending(row_id, f"create answered {exc}")
                self._backoff[model] = time.monotonic() + CREATE_BACKOFF_S
            # Otherwise (a timeout, a dropped connection) it may have been created: the row stays
            # "creating" and reconcile() asks the API's list once it is create_timeout_s old.
            log.warning("economy: creating a message batch of %d %s request(s) failed: %s", len(rows), model, exc)
            return 0
        self._maybe_die("after_create")
        self._record_created(row_id, info, submitted_at=utcnow())
        log.info("economy: message batch %s: %d %s request(s)", info.id, len(rows), model)
        return len(rows)

    def _record_created(self, row_id: int, info: BatchInfo, *, submitted_at: datetime) -> None:
        def do(conn: Connection) -> None:
            conn.execute(update(_MB).where(_MB.c.id == row_id, _MB.c.state == "creating").values(
                api_id=info.id, state="in_progress", submitted_at=submitted_at, counts=info.counts))
            conn.execute(update(_REQ).where(_REQ.c.message_batch_id == row_id, _REQ.c.state == "submitting")
                         .values(state="submitted", submitted_at=submitted_at))
        self.p.run(do)

    def _back_to_pending(self, row_id: int, why: str) -> None:
        def do(conn: Connection) -> None:
            conn.execute(update(_MB).where(_MB.c.id == row_id).values(state="failed", error=why, ended_at=utcnow()))
            conn.execute(update(_REQ).where(_REQ.c.message_batch_id == row_id, _REQ.c.state == "submitting")
                         .values(state="pending", message_batch_id=None, custom_id=None))
        self.p.run(do)

    def _refused(self, row_id: int, exc: ClaudeError) -> None:
        error = {"type": "error", "error": {"type": exc.error_type or "invalid_request_error", "message": str(exc)},
                 "request_id": exc.request_id}

        def do(conn: Connection) -> None:
            now = utcnow()
            conn.execute(update(_MB).where(_MB.c.id == row_id).values(state="failed", error=str(exc), ended_at=now))
            conn.execute(update(_REQ).where(_REQ.c.message_batch_id == row_id, _REQ.c.state == "submitting").values(
                state="done", result_type="errored", result={"type": "errored", "error": error}, submitted_at=now,
                result_at=now))
        self.p.run(do)

    # -- reconciling ----------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Settle the batches left "creating" (module doc)."""
        cutoff = utcnow() - timedelta(seconds=self.config.create_timeout_s)
        rows = self.p.run(lambda c: c.execute(
            select(_MB.c.id, _MB.c.requests, _MB.c.created_at).where(_MB.c.state == "creating",
                                                                      _MB.c.created_at < cutoff)
            .order_by(_MB.c.id)).all(), autocommit=True)
        if not rows:
            return
        listed = self.client.created_since(min(_aware(r.created_at) for r in rows) - timedelta(seconds=60))
        known = set(self.p.run(lambda c: c.scalars(select(_MB.c.api_id).where(
            _MB.c.api_id.in_([b.id for b in listed]))).all(), autocommit=True)) if listed else set()
        for r in rows:
            found = None
            for b in sorted(listed, key=lambda b: b.created_at):
                if b.id in known or b.created_at < _aware(r.created_at) - timedelta(seconds=5) or b.total != r.requests:
                    continue
                if b.status == "ended" and not self._has_prefix(b.id, r.id):
                    continue
                found = b
                break
            if found is not None:
                known.add(found.id)
                log.warning("economy: message batch row %d was created at the API as %s before its dispatcher "
                            "stopped; resuming it", r.id, found.id)
                self._record_created(r.id, found, submitted_at=found.created_at)
            else:
                log.warning("economy: message batch row %d was never created at the API; its %d request(s) go "
                            "back to pending", r.id, r.requests)
                self._back_to_pending(r.id, "never created (its dispatcher stopped mid-create)")

    def _has_prefix(self, api_id: str, row_id: int) -> bool:
        for custom_id, _ in self.client.results(api_id):
            return _request_of(custom_id, row_id) is not None
        return False

    # -- polling --------------------------------------------------------------------------------

    def poll(self) -> None:
        due = utcnow() - timedelta(seconds=self.config.poll_interval_s)
        rows = self.p.run(lambda c: c.execute(
            select(_MB.c.id, _MB.c.api_id).where(_MB.c.state == "in_progress",
                                                 or_(_MB.c.polled_at.is_(None), _MB.c.polled_at < due))
            .order_by(_MB.c.id)).all(), autocommit=True)
        for r in rows:
            try:
                info = self.client.retrieve(r.api_id)
            except ClaudeError as exc:
                # One batch the API will not describe must not hold up the others' polls.
                log.warning("economy: polling message batch %s failed: %s", r.api_id, exc)
                self._update_batch(r.id, polled_at=utcnow(), error=str(exc))
                if exc.status == 404:
                    self._lost(r.id, r.api_id)
                continue
            self._update_batch(r.id, counts=info.counts, polled_at=utcnow())
            if info.status == "ended":
                self.read_results(r.id, r.api_id)

    def read_results(self, row_id: int, api_id: str, *, chunk: int = 500) -> int:
        """Store an ended batch's results against their requests; idempotent (a request already
        done is left as it is), so a dispatcher killed halfway reads the batch again."""
        stored = 0
        buffer: list[tuple[int, dict[str, Any]]] = []

        def flush() -> None:
            nonlocal stored
            now = utcnow()
            items = list(buffer)

            def do(conn: Connection) -> int:
                n = 0
                for request_id, result in items:
                    n += conn.execute(update(_REQ).where(_REQ.c.id == request_id, _REQ.c.message_batch_id == row_id,
                                                         _REQ.c.state == "submitted").values(
                        state="done", result_type=str(result.get("type")), result=result, result_at=now)).rowcount
                return n
            stored += self.p.run(do)
            buffer.clear()
            self._maybe_die("while_polling")

        for custom_id, result in self.client.results(api_id):
            request_id = _request_of(custom_id, row_id)
            if request_id is None:
                log.warning("economy: message batch %s has a result for %r, not one of its requests", api_id,
                            custom_id)
                continue
            buffer.append((request_id, result))
            if len(buffer) >= chunk:
                flush()
        if buffer:
            flush()

        # A request the results left out never ran: as good as expired (resubmitted once).
        self.p.run(partial(_end_unanswered, row_id=row_id))
        log.info("economy: message batch %s ended; %d result(s) stored", api_id, stored)
        return stored

    def _lost(self, row_id: int, api_id: str) -> None:
        """The API no longer knows the batch (deleted elsewhere): its results cannot be read, so
        its requests are taken as expired (made again once, then on the standard path)."""
        log.error("economy: message batch %s is gone from the API; its requests are taken as expired", api_id)
        self.p.run(partial(_end_unanswered, row_id=row_id))

    # -- cancelling, orphans, waking --------------------------------------------------------------

    def cancel_abandoned(self) -> None:
        """Cancel the open batches whose requests all belong to cancelled jobs."""
        live = exists(select(_REQ.c.id).select_from(_REQ.join(_JOBS, _JOBS.c.id == _REQ.c.job_id)).where(
            _REQ.c.message_batch_id == _MB.c.id, _JOBS.c.status != JobStatus.CANCELLED))
        rows = self.p.run(lambda c: c.execute(select(_MB.c.id, _MB.c.api_id).where(
            _MB.c.state == "in_progress", _MB.c.cancel_requested_at.is_(None), ~live)).all(), autocommit=True)
        for r in rows:
            try:
                self.client.cancel(r.api_id)
            except ClaudeError as exc:
                log.warning("economy: cancelling message batch %s failed: %s", r.api_id, exc)
                if exc.status != 404:
                    continue  # tried again next round
            self._update_batch(r.id, cancel_requested_at=utcnow())
            log.info("economy: message batch %s cancelled: every job it served was cancelled", r.api_id)

    def settle_orphans(self) -> None:
        """Answers stored for jobs that have moved on (cancelled while in a batch), or for shadows
        that have ended: an answer was paid for, so it is recorded as a call of its job, not
        applied, and its cost added (to the shadow's, for an evaluation call)."""
        moved_on = and_(_REQ.c.state == "done", _REQ.c.consumed_at.is_(None), ~_live())
        rows = self.p.run(lambda c: c.execute(
            select(_REQ.c.id, _REQ.c.job_id, _REQ.c.purpose, _REQ.c.tier, _REQ.c.model, _REQ.c.result,
                   _REQ.c.result_type, _REQ.c.submitted_at, _REQ.c.result_at, _MB.c.api_id)
            .select_from(_REQ.outerjoin(_MB, _MB.c.id == _REQ.c.message_batch_id))
            .where(moved_on).limit(1000)).all(), autocommit=True)
        for r in rows:
            self.p.run(partial(self._settle, r=r))

    def _update_batch(self, row_id: int, **values: Any) -> None:
        self.p.run(lambda c: c.execute(update(_MB).where(_MB.c.id == row_id).values(**values)), autocommit=True)

    def _settle(self, conn: Connection, *, r: Any) -> None:
        taken = conn.execute(update(_REQ).where(_REQ.c.id == r.id, _REQ.c.consumed_at.is_(None))
                             .values(consumed_at=utcnow())).rowcount
        if not taken:
            return
        if r.result_type != "succeeded":
            budgets.settle_request(conn, request_ids=[r.id])  # not billed: its hold goes
            return
        outcome = outcome_of(r.result or {}, submitted_at=r.submitted_at or r.result_at, result_at=r.result_at,
                             message_batch_id=r.api_id, request_id=r.id)
        assert isinstance(outcome, CallResult)
        a = outcome.attempts[0]
        cost = self.cost(r.tier, a.usage)
        budgets.settle_request(conn, request_ids=[r.id], cost=cost)
        conn.execute(insert(_CALLS).values(
            job_id=r.job_id, stage=r.purpose, tier=r.tier, model=r.model, attempt=1, delivery=0, outcome="ok",
            input_tokens=a.usage.input_tokens, output_tokens=a.usage.output_tokens,
            cache_creation_input_tokens=a.usage.cache_creation_input_tokens,
            cache_read_input_tokens=a.usage.cache_read_input_tokens, cost_usd=cost, latency_ms=a.latency_ms,
            request_id=a.request_id, status_code=200, stop_reason=a.stop_reason, response_text=a.text,
            applied=False, started_at=a.started_at, finished_at=a.finished_at, message_batch_id=r.api_id))
        if r.purpose in EVALUATION:  # evaluation cost: the shadow's, never the job's
            conn.execute(update(_SHADOWS).where(_SHADOWS.c.job_id == r.job_id)
                         .values(cost_usd=_SHADOWS.c.cost_usd + cost))
        else:
            conn.execute(update(_JOBS).where(_JOBS.c.id == r.job_id).values(cost_usd=_JOBS.c.cost_usd + cost))

    def cost(self, tier: str, usage: Any) -> Decimal:
        models = self.p.models
        return call_cost(models.tier(tier), usage, config=models, batch=True)

    def wake(self) -> int:
        """Jobs parked for an answer that is now stored: due at once, for refeed to publish, as many
        as there are places in flight (a message batch of 100,000 answers must not put 100,000
        messages in the broker at once: the rest are woken in later rounds, oldest first); and
        shadows likewise, for the shadow sweep to publish."""
        now = utcnow()
        unread = and_(_REQ.c.state == "done", _REQ.c.consumed_at.is_(None))
        answered = select(_REQ.c.job_id).where(unread, _REQ.c.job_version == _JOBS.c.version)

        def do(c: Connection) -> int:
            if c.scalar(select(_REQ.c.id).where(unread).limit(1)) is None:
                return 0  # the usual round: nothing answered and unread (a partial index holds them)
            due = (select(_JOBS.c.id).where(_JOBS.c.id.in_(select(_REQ.c.job_id).where(unread)),
                                            _JOBS.c.not_before > now, _JOBS.c.claimed_at.is_(None),
                                            _JOBS.c.status.in_(ACTIVE),
                                            exists(answered.where(_REQ.c.job_id == _JOBS.c.id)))
                   .order_by(_JOBS.c.id))
            if self.max_in_flight is not None:
                busy = c.scalar(select(func.count()).select_from(Job).where(in_flight(now))) or 0
                due = due.limit(max(0, self.max_in_flight - busy))
            jobs = c.execute(update(_JOBS).where(_JOBS.c.id.in_(due.scalar_subquery()))
                             .values(not_before=now)).rowcount
            shadows = c.execute(
                update(_SHADOWS).where(_SHADOWS.c.job_id.in_(select(_REQ.c.job_id).where(
                    unread, _REQ.c.purpose.in_(EVALUATION))), _SHADOWS.c.not_before > now,
                    _SHADOWS.c.claimed_at.is_(None), _SHADOWS.c.status.in_(OPEN_SHADOW))
                .values(not_before=now)).rowcount
            return int(jobs) + int(shadows)
        return int(self.p.run(do, autocommit=True))


def build_economy(p: Pipeline, settings: Settings) -> Economy:
    """The dispatcher's Economy, from the settings (the same key and endpoint as the workers')."""
    client = BatchClient(api_key=settings.api_key or "", base_url=settings.anthropic_base_url,
                         timeout_s=min(settings.call_timeout_s, p.models.economy.create_timeout_s / 2))
    return Economy(p, client, p.models.economy, kill_at=settings.test_economy_kill,
                   max_in_flight=settings.max_in_flight)


@dataclass(frozen=True)
class Saving:
    """What a selection of jobs' calls made in message batches cost, against the same calls at the
    standard price (their cost over the configured batch multiplier: every token of such a call
    is billed at that multiple, so the division is exact)."""

    calls: int
    cost_usd: Decimal
    standard_cost_usd: Decimal

    @property
    def saved_usd(self) -> Decimal:
        return self.standard_cost_usd - self.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "cost_usd": f"{self.cost_usd:f}",
                "standard_cost_usd": f"{self.standard_cost_usd:f}", "saved_usd": f"{self.saved_usd:f}"}


def saving(conn: Any, *, batch_multiplier: Decimal, job_filter: Any) -> Saving:
    """The Saving of the jobs ``job_filter`` selects (pipeline.queries.report's filter)."""
    n, cost = conn.execute(select(func.count(), func.coalesce(func.sum(_CALLS.c.cost_usd), 0))
                           .select_from(_CALLS.join(_JOBS, _JOBS.c.id == _CALLS.c.job_id))
                           .where(_CALLS.c.message_batch_id.is_not(None), job_filter)).one()
    cost = Decimal(cost)
    standard = cost / batch_multiplier if batch_multiplier else cost
    return Saving(calls=int(n), cost_usd=cost, standard_cost_usd=standard.quantize(Decimal("0.00000001")))


def open_batches(conn: Connection) -> list[dict[str, Any]]:
    """The message batches not yet ended, per model: requests, age, counts (for `status`)."""
    now = utcnow()
    rows = conn.execute(select(_MB.c.model, _MB.c.api_id, _MB.c.state, _MB.c.requests, _MB.c.counts,
                               _MB.c.created_at).where(_MB.c.state.in_(("creating", "in_progress")))
                        .order_by(_MB.c.model, _MB.c.id)).all()
    pending: dict[str, int] = dict(conn.execute(select(_REQ.c.model, func.count()).where(_REQ.c.state == "pending")
                                .group_by(_REQ.c.model)).all())
    by_model: dict[str, dict[str, Any]] = defaultdict(lambda: {"batches": [], "pending_requests": 0})
    for model, n in pending.items():
        by_model[model]["pending_requests"] = n
    for r in rows:
        by_model[r.model]["batches"].append({
            "id": r.api_id, "state": r.state, "requests": r.requests,
            "age_s": round((now - r.created_at).total_seconds(), 1), "counts": r.counts or {}})
    return [{"model": m, **v} for m, v in sorted(by_model.items())]
