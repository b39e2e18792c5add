"""Submitting work over HTTP: the same checks, the same insert path and the same tenant limits as
`switchyard enqueue --tenant` (``enqueue_items`` with the caller's tenant), plus what only the API
needs: the spend check before a body is read, one transaction per request (so a refused or invalid
submission leaves nothing behind), and bad items named by their index or line."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.api.bodies import JSON, JSON_LINES, iter_json_array, iter_json_lines
from pipeline.config import ModelConfig
from pipeline.errors import BadItem, InputFileError, JobInputError, UnsupportedMediaType
from pipeline.intake.enqueue import EnqueueReport, Source, enqueue_items, iter_objects
from pipeline.intake.jobspec import JobSpec, TaskLookup
from pipeline.models import Job
from pipeline.tenants import Caller

log = logging.getLogger("switchyard.api")


def check_spend(sessions: sessionmaker[Session], who: Caller) -> None:
    """Refuse early, before reading a large body, when today's spend is already over the limit."""
    with sessions() as session:
        tenant = session.get(tenants.Tenant, who.tenant_id)
        if tenant is not None:
            tenants.check_spend(session, tenant)


def submit_items(sessions: sessionmaker[Session], source: Source, *, who: Caller,
                 batch: str, lines: bool, shadow_rate: float | None = None, priority: int | None = None,
                 mode: str | None = None, budget_usd: Decimal | None = None) -> EnqueueReport:
    try:
        report = enqueue_items(sessions, source, batch=batch, tenant_id=who.tenant_id, atomic=True,
                               shadow_rate=shadow_rate, priority=priority, mode=mode, budget_usd=budget_usd)
    except (BadItem, InputFileError):
        raise  # said already, or about the whole body: no item to name
    except JobInputError as exc:
        number = exc.line if exc.line is not None else 0
        raise BadItem(exc.reason, line=number if lines else None, index=None if lines else number) from None
    log.info("tenant %s: batch %r: %d new job(s), %d duplicate(s)", who.tenant, batch, report.accepted,
             report.duplicates)
    return report


def body_reader(media_type: str) -> tuple[Any, bool]:
    """How to read a batch body of this Content-Type, and whether it is JSON Lines. Checked before
    the body is read."""
    if media_type in JSON_LINES:
        return iter_json_lines, True
    if media_type in (JSON, ""):
        return iter_json_array, False
    raise UnsupportedMediaType(f"Content-Type {media_type!r} is not supported: send a JSON array as "
                               f"{JSON} or JSON Lines as {JSON_LINES[0]}")


def batch_source(body: IO[bytes], reader: Any, *, config: ModelConfig, max_items: int,
                 tasks: TaskLookup | None = None) -> Source:
    """A re-readable source of parsed jobs from a spooled body: ``enqueue_items`` reads it again if
    a new batch's body repeats a key. ``tasks`` finds the tasks its jobs name."""
    return lambda _position: iter_objects(reader(body, max_items=max_items), config=config, tasks=tasks)


def one_job_source(spec: JobSpec) -> Source:
    return lambda _position: iter([(0, "", spec)])


def find_job(session: Session, batch_id: int, key: str) -> tuple[int, str]:
    row = session.execute(select(Job.id, Job.status).where(Job.batch_id == batch_id, Job.key == key)).one()
    return row.id, row.status.value
