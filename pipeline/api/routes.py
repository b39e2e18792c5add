"""The tenant-facing endpoints: submit, follow, cancel and fetch work. Each is a thin layer over
the domain functions the CLI uses (``enqueue_items``, ``pipeline.queries.history``, ``report``), always
scoped to the caller's tenant: another tenant's job or batch answers 404, like a missing one."""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from decimal import Decimal
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from pipeline import tenants
from pipeline.api import schemas
from pipeline.api.bodies import JSON_LINES, media_type, spool
from pipeline.api.deps import Db, State, Who, caller, state
from pipeline.api.submit import batch_source, body_reader, check_spend, find_job, one_job_source, submit_items
from pipeline.db import transaction
from pipeline.errors import BrokerDown, InvalidQuery, JobInputError, NotFound, UnsupportedMediaType
from pipeline.flow import budgets
from pipeline.flow.admission import valid_priority
from pipeline.intake import tasks
from pipeline.intake.enqueue import max_job_tokens
from pipeline.intake.jobspec import MAX_KEY_LENGTH, decode_json, parse_job
from pipeline.models import Batch, Tenant
from pipeline.names import MAX_BATCH_NAME_LENGTH, check_batch_name
from pipeline.queries import history, ops, report
from pipeline.queries.quality import quality as report_quality

log = logging.getLogger("switchyard.api")

# Every route under /v1 needs a token, whether or not its handler asks for the caller.
router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.Error, "description": text} for code, text in {
        401: "No token, or one that is unknown, malformed or revoked.",
        422: "A parameter or the body is invalid; `detail` names it.",
    }.items()
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": schemas.Error, "description": "No such id for this tenant."}}
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.Error, "description": text} for code, text in {
        409: "The batch was cancelled.",
        413: "The body, or the number of jobs in it, is over the configured limit.",
        415: "The Content-Type is not JSON or JSON Lines, or the body is compressed (Content-Encoding).",
        429: "A tenant limit (jobs in flight, spend per day) would be exceeded; `detail` gives the numbers.",
    }.items()
}

# A name to look up: printable, no control characters (Postgres text cannot hold NUL).
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
# A name to create a batch by is checked by check_batch_name, the rule `switchyard enqueue` applies
# too; the document states its length, and the handler enforces all of it.
BatchName = Annotated[str, Query(
    description="The batch to add to (created if new). Names are per tenant: at most "
                f"{MAX_BATCH_NAME_LENGTH} characters, not only whitespace, with no control characters, line "
                "separators or bidirectional controls.",
    json_schema_extra={"minLength": 1, "maxLength": MAX_BATCH_NAME_LENGTH})]

ShadowRate = Annotated[float | None, Query(
    ge=0, le=1, description="The share of the batch's jobs that shadow evaluation samples, from 0 to 1 (see "
                            "`/v1/quality`); default: the task's, or the configuration's `shadow_rate`.")]

Mode = Annotated[Literal["standard", "economy"] | None, Query(
    description="How the batch's model calls are made: `standard` (synchronous) or `economy` (through the "
                "Message Batches API at half price; answers within hours rather than seconds). Default: the "
                "task's `mode`, else standard.")]


# Checked by the handler, not by Query(ge=, le=): the answer is then one sentence, as the CLI's.
Priority = Annotated[int | None, Query(
    description="The batch's priority, 0-9: the dispatcher admits higher priorities first, and round robin across "
                "tenants and batches within one; default: the task's `priority`, else 5. Given for a batch that "
                "exists, it changes the batch's.", json_schema_extra={"minimum": 0, "maximum": 9})]


BudgetUsd = Annotated[str | None, Query(
    max_length=40, description="The batch's spending cap in USD, 0 or more (a decimal string): no call is made that "
                               "could take the batch's spend over it, and jobs that do not fit pause (status "
                               "`paused`) until it is raised (`POST /v1/batches/{id}/budget`).")]


def _budget(value: str, *, param: str) -> Decimal:
    return budgets.check_budget(value, where=f"query parameter {param!r}")


def _batch_name(value: str, *, param: str) -> str:
    try:
        return check_batch_name(value)
    except JobInputError as exc:
        raise InvalidQuery(f"query parameter {param!r}: {exc}") from None

_TEXT = {"type": "string", "minLength": 1}
_COMMON = {"key": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH,
                   "description": "Idempotency key within the batch; default: a digest of the content."},
           "tier": {"type": "string",
                    "description": "Pin a work tier (skips triage): one the policy routes to, e.g. sonnet or opus."},
           "metadata": {"type": "object", "description": "Kept with the job, returned with it."}}


def _kind(kind: str, required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["kind", *required],
            "properties": {"kind": {"type": "string", "enum": [kind]}, **required, **(optional or {}), **_COMMON}}


JOB_SCHEMA: dict[str, Any] = {"title": "Job", "oneOf": [
    _kind("classify", {"text": _TEXT, "labels": {"type": "array", "minItems": 1, "uniqueItems": True,
                                                  "items": _TEXT}}),
    _kind("extract", {"text": _TEXT, "schema": {"type": "object", "description": "A JSON Schema."}}),
    _kind("draft", {"instructions": _TEXT}, {"context": {"type": "string"}}),
    _kind("generate", {"prompt": _TEXT}),
    {"type": "object", "required": ["task"], "description": "A job under a task (`/v1/tasks`): its kind, labels "
     "and schema are the task's, bound to its latest version (or `task_version`) when submitted; it carries the "
     "text fields of the task's kind, and no labels or schema.",
     "properties": {"task": {"type": "string", "minLength": 1}, "task_version": {"type": "integer", "minimum": 1},
                    "text": _TEXT, "instructions": _TEXT, "context": {"type": "string"}, "prompt": _TEXT,
                    **_COMMON}},
]}


def _body(content: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": content}}


def _json(obj: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(history.jsonable(obj), status_code=status_code)


# -- submission ------------------------------------------------------------------------------------


@router.post("/jobs", status_code=201, response_model=schemas.JobSubmitted, tags=["submit"],
             responses={200: {"model": schemas.JobSubmitted, "description": "The batch already had a job with "
                                                                            "this key: nothing was added."},
                        **ERRORS, **SUBMIT_ERRORS},
             openapi_extra=_body({"application/json": {"schema": JOB_SCHEMA}}))
async def submit_job(request: Request, who: Who, batch: BatchName) -> JSONResponse:
    """Submit one job. Its `key` (or, without one, its content) makes a repeat harmless."""
    batch = _batch_name(batch, param="batch")
    api = state(request)
    await run_in_threadpool(check_spend, api.sessions, who)
    kind = media_type(request)
    if kind not in ("application/json", ""):
        raise UnsupportedMediaType(f"Content-Type {kind!r} is not supported: send the job as application/json")
    with await spool(request, max_bytes=api.max_body_bytes) as body:
        raw = body.read()
    try:
        # UTF-8, as a batch body must be, with or without a byte-order mark.
        obj = decode_json(raw.removeprefix(codecs.BOM_UTF8))
    except JobInputError as exc:
        raise JobInputError(f"body: {exc}") from None
    named = tasks.lookup(api.sessions, tenant_id=who.tenant_id)
    spec = await run_in_threadpool(parse_job, obj, work_tiers=api.models.work_tiers,
                                   max_tokens=max_job_tokens(api.models), tasks=named)
    result = await run_in_threadpool(submit_items, api.sessions, one_job_source(spec), who=who, batch=batch,
                                     lines=False)

    def lookup() -> tuple[int, str]:
        with api.sessions() as session:
            return find_job(session, result.batch_id or 0, spec.key)

    request.app.state.metrics.jobs_accepted.inc(result.accepted)
    job_id, job_status = await run_in_threadpool(lookup)
    out = schemas.JobSubmitted(id=job_id, batch_id=result.batch_id or 0, batch=batch, key=spec.key,
                               created=result.accepted == 1, status=job_status)
    return JSONResponse(out.model_dump(), status_code=201 if out.created else 200)


@router.post("/batches", status_code=201, response_model=schemas.BatchSubmitted, tags=["submit"],
             responses={**ERRORS, **SUBMIT_ERRORS},
             openapi_extra=_body({
                 "application/json": {"schema": {"type": "array", "items": JOB_SCHEMA}},
                 JSON_LINES[0]: {"schema": {"type": "string", "description": "One job object per line."}},
             }))
async def submit_batch(request: Request, who: Who, name: BatchName, shadow_rate: ShadowRate = None,
                       priority: Priority = None, mode: Mode = None,
                       budget_usd: BudgetUsd = None) -> schemas.BatchSubmitted:
    """Submit jobs to a batch: a JSON array, or JSON Lines (`application/x-ndjson`) streamed in.

    Every job is checked before any is written: one bad job refuses the request (422, naming its
    index or line and the field) and nothing is kept. Keys already in the batch are skipped, so
    sending the same body twice adds nothing. `shadow_rate` sets the share of the batch's jobs that
    shadow evaluation samples (see `/v1/quality`); `priority` the batch's priority (0-9); `mode` makes
    its model calls standard or economy."""
    name = _batch_name(name, param="name")
    if priority is not None and not valid_priority(priority):
        raise InvalidQuery(f"query parameter 'priority' must be a whole number from 0 to 9, not {priority}")
    budget = None if budget_usd is None else _budget(budget_usd, param="budget_usd")
    api = state(request)
    await run_in_threadpool(check_spend, api.sessions, who)
    reader, lines = body_reader(media_type(request))
    with await spool(request, max_bytes=api.max_body_bytes) as body:
        source = batch_source(body, reader, config=api.models, max_items=api.max_batch_jobs,
                              tasks=tasks.lookup(api.sessions, tenant_id=who.tenant_id))
        result = await run_in_threadpool(submit_items, api.sessions, source, who=who, batch=name, lines=lines,
                                         shadow_rate=shadow_rate, priority=priority, mode=mode,
                                         budget_usd=budget)
    request.app.state.metrics.jobs_accepted.inc(result.accepted)
    return schemas.BatchSubmitted(batch_id=result.batch_id or 0, batch=name, read=result.read,
                                  accepted=result.accepted, duplicates=result.duplicates)


# -- jobs ------------------------------------------------------------------------------------------


@router.get("/jobs", response_model=schemas.JobPage, tags=["jobs"], responses={**ERRORS, **NOT_FOUND})
def list_jobs(
    db: Db, who: Who,
    batch: Annotated[str | None, Query(max_length=200, pattern=NAME_PATTERN,
                                       description="A batch name or id.")] = None,
    status: Annotated[list[str] | None, Query(description="Any of these statuses (repeat the parameter).")] = None,
    tier: Annotated[str | None, Query(max_length=40, pattern=NAME_PATTERN)] = None,
    kind: Annotated[str | None, Query(description="classify, extract, draft or generate")] = None,
    since: Annotated[str | None, Query(description="Created at or after: ISO 8601 or an age (30m, 6h, 2d).")] = None,
    until: Annotated[str | None, Query(description="Created before: ISO 8601 or an age.")] = None,
    key_prefix: Annotated[str | None, Query(max_length=200, pattern=NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=history.MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=100, description="`next_cursor` of the previous page.")] = None,
) -> JSONResponse:
    """The tenant's jobs, newest first, a page at a time (keyset paging: follow `next_cursor`)."""
    filters = history.JobFilters.read(batch=batch, status=status, tier=tier, kind=kind, since=since, until=until,
                                      key_prefix=key_prefix, tenant_id=who.scope)
    return _json(history.list_jobs(db_session=db, filters=filters, limit=limit, cursor=cursor))


@router.get("/jobs/{job_id}", response_model=schemas.JobStory, tags=["jobs"], responses={**ERRORS, **NOT_FOUND})
def get_job(job_id: int, db: Db, who: Who) -> JSONResponse:
    """One job with its whole story: routing decisions, every model call, validation verdicts and
    status changes, each in the order they happened."""
    return _json(history.get_job(db_session=db, job_id=job_id, tenant_id=who.scope))


# -- batches ---------------------------------------------------------------------------------------


def _batch(summary: history.BatchSummary) -> dict[str, Any]:
    out: dict[str, Any] = history.jsonable(summary)
    out.pop("tenant")  # always the caller's own: the operator's listing needs it, a tenant's does not
    out.update(done=summary.done, finished=summary.finished)
    return out


@router.get("/batches", response_model=schemas.BatchList, tags=["batches"], responses=ERRORS)
def list_batches(db: Db, who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JSONResponse:
    """The tenant's newest batches, each with its jobs per status and its cost so far."""
    batches = history.list_batches(db_session=db, limit=limit, tenant_id=who.scope)
    return JSONResponse({"batches": [_batch(b) for b in batches]})


@router.get("/batches/{batch_id}", response_model=schemas.BatchSummary, tags=["batches"],
            responses={**ERRORS, **NOT_FOUND})
def get_batch(batch_id: int, db: Db, who: Who) -> JSONResponse:
    """One batch: its jobs per status, how many are done, and its cost so far."""
    return JSONResponse(_batch(history.get_batch(db_session=db, batch=batch_id, tenant_id=who.scope)))


@router.post("/batches/{batch_id}/cancel", response_model=schemas.Cancelled, tags=["batches"],
             responses={**ERRORS, **NOT_FOUND})
def cancel_batch(batch_id: int, db: Db, who: Who) -> JSONResponse:
    """Cancel the batch's jobs that are not being worked: not started, or waiting out transient
    errors between tries; jobs in a call right now finish. The batch then takes no new jobs.
    Repeating it is harmless."""
    result = history.cancel_batch(db_session=db, batch=batch_id, tenant_id=who.scope)
    log.info("tenant %s cancelled batch %d: %d job(s)", who.tenant, batch_id, result.cancelled)
    return _json(result)


@router.post("/batches/{batch_id}/budget", response_model=schemas.BudgetState, tags=["batches"],
             responses={**ERRORS, **NOT_FOUND})
def set_budget(batch_id: int, db: Db, who: Who,
               usd: Annotated[str, Query(max_length=40, description="The new budget in USD, 0 or more.")],
               ) -> JSONResponse:
    """Set the batch's spending cap. Raised, the jobs paused for it resume at the dispatcher's next
    tick; lowered under what is spent and reserved, the next calls pause their jobs."""
    amount = _budget(usd, param="usd")
    b = _own_batch(db, batch_id, who)
    budgets.set_budget(db, b.id, amount)
    db.commit()
    return _json(budgets.states(db, [b.id])[b.id].as_dict())


@router.post("/batches/{batch_id}/resume", response_model=schemas.BudgetState, tags=["batches"],
             responses={**ERRORS, **NOT_FOUND})
def resume_batch(batch_id: int, db: Db, who: Who) -> JSONResponse:
    """Resume the batch's paused jobs at the dispatcher's next tick, whatever their budget's room (one
    that still does not fit pauses again at its next call). 422 if none is paused."""
    b = _own_batch(db, batch_id, who)
    budgets.resume_batch(db, b.id, b.name)
    db.commit()
    return _json(budgets.states(db, [b.id])[b.id].as_dict())


def _own_batch(db: Db, batch_id: int, who: Who) -> Batch:
    return history.find_batch(db_session=db, batch=batch_id, tenant_id=who.scope)


@router.get("/batches/{batch_id}/results", tags=["batches"], responses={
    200: {"description": "One JSON object per line: key, status, tier, output, error, cost_usd; in the order "
                         "the jobs were submitted.", "content": {JSON_LINES[0]: {"schema": {"type": "string"}}}},
    **ERRORS, **NOT_FOUND})
def batch_results(batch_id: int, request: Request, db: Db, who: Who) -> StreamingResponse:
    """Stream the batch's results as JSON Lines, whether or not it has finished."""
    batch = _own_batch(db, batch_id, who)
    sessions = state(request).sessions

    def lines() -> Iterator[bytes]:
        # Its own session: the response streams after the request's session is closed.
        with sessions() as session:
            chunk: list[str] = []
            for row in history.iter_results(db_session=session, batch_id=batch.id):
                chunk.append(json.dumps(history.jsonable(row), ensure_ascii=False))
                if len(chunk) >= 200:
                    yield ("\n".join(chunk) + "\n").encode()
                    chunk.clear()
            if chunk:
                yield ("\n".join(chunk) + "\n").encode()

    return StreamingResponse(lines(), media_type=JSON_LINES[0],
                             headers={"Content-Disposition": f'attachment; filename="batch-{batch.id}.jsonl"'})


# -- tasks -----------------------------------------------------------------------------------------

TOML_TYPES = ("application/toml", "text/toml", "text/x-toml")
TASK_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.Error, "description": text} for code, text in {
        413: "The body is over the configured limit.",
        415: "The Content-Type is not TOML or JSON, or the body is compressed (Content-Encoding).",
    }.items()
}


def _task(t: tasks.TaskVersion, *, definition: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"task": t.name, "version": t.version, "kind": t.kind, "content_sha256": t.content_sha256,
                           "created_at": t.created_at.isoformat()}
    if definition:
        out["definition"] = t.definition
    return out


@router.post("/tasks", tags=["tasks"], responses={
    200: {"description": "The latest version already had this content: nothing was added."},
    201: {"description": "The task was created, or a new version of it added."}, **ERRORS, **TASK_ERRORS},
    openapi_extra=_body({"application/toml": {"schema": {"type": "string", "description": "The task file."}},
                         "application/json": {"schema": {"type": "object", "description": "The task, as JSON."}}}))
async def apply_task(request: Request, who: Who) -> JSONResponse:
    """Apply a task definition (TOML or JSON): its first version, or a new version when its content
    changed since the latest; the same content again adds nothing (200, `created` false)."""
    api = state(request)
    kind = media_type(request)
    if kind not in (*TOML_TYPES, "application/json", ""):
        raise UnsupportedMediaType(f"Content-Type {kind!r} is not supported: send the task as application/toml "
                                   f"or application/json")
    with await spool(request, max_bytes=api.max_body_bytes) as body:
        raw = body.read()
    try:
        obj = tasks.read_toml(raw) if kind in TOML_TYPES else decode_json(raw.removeprefix(codecs.BOM_UTF8))
    except JobInputError as exc:
        raise JobInputError(f"body: {exc}") from None
    # Off the event loop: checking a schema and the examples against it can take a while.
    spec = await run_in_threadpool(tasks.parse_task, obj, work_tiers=api.models.work_tiers)

    def store() -> tasks.Applied:
        with transaction(api.sessions) as session:
            return tasks.apply(session, spec, tenant_id=who.tenant_id)

    result = await run_in_threadpool(store)
    return JSONResponse({"task": result.name, "version": result.version, "created": result.created,
                         "content_sha256": result.content_sha256}, status_code=201 if result.created else 200)


@router.get("/tasks", tags=["tasks"], responses=ERRORS)
def list_tasks(db: Db, who: Who) -> JSONResponse:
    """The tenant's tasks, each at its latest version."""
    return JSONResponse({"tasks": [_task(t, definition=False) for t in tasks.get_all(db, tenant_id=who.tenant_id)]})


@router.get("/tasks/{name}", tags=["tasks"], responses={**ERRORS, **NOT_FOUND})
def get_task(name: str, db: Db, who: Who,
             version: Annotated[int | None, Query(ge=1, description="This version; default: the latest.")] = None,
             ) -> JSONResponse:
    """One version of one of the tenant's tasks, with its whole definition."""
    return JSONResponse(_task(tasks.get(db, name, tenant_id=who.tenant_id, version=version), definition=True))


# -- stats and queue -------------------------------------------------------------------------------


@router.get("/stats", response_model=schemas.Stats, tags=["stats"], responses={**ERRORS, **NOT_FOUND})
def stats(request: Request, db: Db, who: Who,
          batch_id: Annotated[int | None, Query(description="Only this batch.")] = None,
          since: Annotated[str | None, Query(description="Jobs created at or after (ISO 8601 or an age).")] = None,
          until: Annotated[str | None, Query(description="Jobs created before.")] = None) -> JSONResponse:
    """Per tier: jobs, calls, tokens, cost, latency percentiles, escalation and validation-failure
    rates, for the tenant's jobs (or one batch of them)."""
    if batch_id is not None:
        _own_batch(db, batch_id, who)
    summary = report.summarize(
        db, state(request).models, batch_id=batch_id, tenant_id=who.scope,
        since=history.parse_time(since, option="since") if since else None,
        until=history.parse_time(until, option="until") if until else None)
    return JSONResponse(summary.to_dict())


@router.get("/quality", response_model=schemas.QualityReport, tags=["stats"], responses={**ERRORS, **NOT_FOUND})
def quality(request: Request, db: Db, who: Who,
            batch_id: Annotated[int | None, Query(description="Only this batch.")] = None,
            task: Annotated[str | None, Query(description="Only the jobs of this task (every version).",
                                              pattern=NAME_PATTERN, max_length=100)] = None,
            since: Annotated[str | None, Query(description="Jobs created at or after (ISO 8601 or an age).")] = None,
            ) -> JSONResponse:
    """Agreement of the tenant's routed answers with the reference tier's, from shadow evaluation:
    per final tier and triage difficulty, the stratified estimate over all, the cost against
    sending every job to the reference tier, and the evaluation cost (apart from the jobs')."""
    if batch_id is not None:
        _own_batch(db, batch_id, who)
    figures = report_quality(db, state(request).models, batch_id=batch_id, task=task, tenant_id=who.scope,
                             since=history.parse_time(since, option="since") if since else None)
    return JSONResponse(figures.to_dict())


@router.get("/queue", response_model=schemas.QueueStatus, tags=["stats"],
            responses={**ERRORS, 503: {"model": schemas.Error, "description": "The broker is unreachable."}})
def queue(api: State, db: Db, who: Who) -> schemas.QueueStatus:
    """How busy switchyard is, per queue (the operator's `switchyard status`, without worker hosts),
    and where this tenant stands against its limits."""
    tenant = db.get(Tenant, who.tenant_id)
    if tenant is None:
        raise NotFound("this token's tenant no longer exists")
    if api.broker is None or api.limiter is None:
        raise BrokerDown("queue status needs a Redis broker (BROKER_URL)")
    try:
        now = ops.gather(api.broker, db, api.models, api.limiter)
    except redis.RedisError as exc:
        raise BrokerDown(f"the broker is unreachable ({type(exc).__name__})") from None
    spent = tenants.spend_today(db, tenant.id)
    limit = tenant.max_spend_per_day_usd
    return schemas.QueueStatus(
        queues=[schemas.QueueLine(**asdict(q)) for q in now.queues], queued=now.queued, in_flight=now.in_flight,
        finished_1m=now.finished_1m, finished_5m=now.finished_5m,
        tenant=schemas.TenantUsage(
            tenant=tenant.name, jobs_in_flight=tenants.jobs_in_flight(db, tenant.id),
            max_jobs_in_flight=tenant.max_jobs_in_flight, spend_today_usd=f"{spent:f}",
            max_spend_per_day_usd=f"{limit:f}" if limit is not None else None))
