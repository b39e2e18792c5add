"""Tenants, their API tokens and their limits.

A token is ``sy_<prefix>_<secret>``. Only the SHA-256 of the secret is stored: the secret has 256
bits of entropy, so a plain hash is as good as a slow one and costs nothing per request. The prefix
is public (``tokens list`` shows it) and is the lookup key, so checking a token is one index hit
and one constant-time compare. Verbs take a session and never commit; the caller owns the
transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline.db import Executor, insert_or_skip
from pipeline.errors import BatchCancelled, InvalidInput, LimitExceeded, NotFound
from pipeline.models import TERMINAL, ApiToken, Batch, Job, ModelCall, Money, Tenant, utcnow
from pipeline.names import quoted

# Used with fullmatch: with match, "$" also matches before a final newline, so "a\n" passed.
TOKEN_RE = re.compile(r"sy_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
PREFIX_RE = re.compile(r"[0-9a-f]{12}")
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class NewToken:
    id: int
    tenant: str
    prefix: str
    token: str  # shown once, never stored
    created_at: datetime
    operator: bool = False


@dataclass(frozen=True)
class TokenInfo:
    id: int
    tenant: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    operator: bool = False


@dataclass(frozen=True)
class Caller:
    """Who a request is from: the tenant a valid token belongs to. An operator's token reads every
    tenant's work (``scope`` is None); it still submits as its own tenant."""

    tenant_id: int
    tenant: str
    token_prefix: str
    operator: bool = False

    @property
    def scope(self) -> int | None:
        """The tenant_id that reads are confined to: None (every tenant) for an operator."""
        return None if self.operator else self.tenant_id


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_tenant_name(name: str) -> str:
    # Checked before any lookup too: a name no tenant can have (invalid UTF-8 from the command
    # line, say) is the user's mistake to name, not something to send to Postgres.
    if not TENANT_NAME_RE.fullmatch(name):
        raise InvalidInput(f"tenant name {quoted(name)} must be 1-100 letters, digits, '.', '_' or '-'")
    return name


def get_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def get_or_create(session: Session, name: str) -> Tenant:
    tenant = get_by_name(session, check_tenant_name(name))
    if tenant is None:
        # Two commands making the same new tenant at once: the second waits for the first's row
        # and then takes it, instead of failing on the unique name.
        session.execute(insert_or_skip(session, Tenant).values(name=name, created_at=utcnow())
                        .on_conflict_do_nothing())
        tenant = get_by_name(session, name)
        assert tenant is not None
    return tenant


def require(session: Session, name: str) -> Tenant:
    """The tenant called ``name``; never made on the fly (only ``create_token`` makes one), so a
    mistyped name is refused rather than given a tenant of its own, with no limits."""
    tenant = get_by_name(session, check_tenant_name(name))
    if tenant is None:
        raise NotFound(f"no tenant called {name!r}: `switchyard tenants list` lists them, and `switchyard tokens "
                       f"create --tenant {name}` makes one")
    return tenant


def get_all(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


# What the limit columns hold (models.Tenant): a Postgres integer, and dollars as Money.
MAX_JOBS_IN_FLIGHT = 2**31 - 1
SPEND_PLACES = Money.scale or 0
SPEND_STEP = Decimal(1).scaleb(-SPEND_PLACES)
SPEND_CEILING = Decimal(10) ** ((Money.precision or 0) - SPEND_PLACES)


def check_jobs_in_flight(value: int) -> int:
    if value < 0:
        raise InvalidInput("--jobs-in-flight must be 0 or more")
    if value > MAX_JOBS_IN_FLIGHT:
        raise InvalidInput(f"--jobs-in-flight {value:,} is over the largest limit, {MAX_JOBS_IN_FLIGHT:,}")
    return value


def check_spend_per_day(value: Decimal) -> Decimal:
    """The limit as it will be stored. Postgres would round a finer one to the column's places
    (0.0000000001 to 0), so it is refused rather than stored as something else."""
    if not value.is_finite():
        raise InvalidInput(f"--spend-per-day {str(value)!r} is not a number of dollars")
    if value < 0:
        raise InvalidInput("--spend-per-day must be 0 or more")
    if value >= SPEND_CEILING:
        raise InvalidInput(f"--spend-per-day must be under ${SPEND_CEILING:,f} a day")
    kept = abs(value.quantize(SPEND_STEP))  # abs: -0 is 0
    if kept != value:
        shown = f"{value:f}"
        raise InvalidInput(f"--spend-per-day {shown if len(shown) <= 40 else value} has more than {SPEND_PLACES} "
                            f"decimal places; limits are kept to ${SPEND_STEP:f}")
    return kept


# A tenant's weight in the dispatcher's round robin (pipeline.flow.admission): its share of the jobs
# in flight against the other tenants with work at the same priority is in proportion to it.
MAX_WEIGHT = 1000.0


def check_weight(value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= MAX_WEIGHT):
        raise InvalidInput(f"--weight must be a number above 0 and at most {MAX_WEIGHT:g} (a tenant's share of the "
                           f"jobs in flight, against the others' weights; 1 by default), not {value}")
    return float(value)


def set_limits(session: Session, name: str, *, max_jobs_in_flight: int | None, max_spend_per_day_usd: Decimal | None,
               clear: bool = False, weight: float | None = None) -> Tenant:
    """Set the limits given (None leaves one as it is); ``clear`` first removes both. A limit of 0
    accepts no new jobs. ``weight``: the tenant's weight in the dispatcher's round robin (``clear``
    leaves it). The tenant comes back as stored, so the caller shows what is enforced."""
    jobs = None if max_jobs_in_flight is None else check_jobs_in_flight(max_jobs_in_flight)
    spend = None if max_spend_per_day_usd is None else check_spend_per_day(max_spend_per_day_usd)
    share = None if weight is None else check_weight(weight)
    tenant = require(session, name)
    if share is not None:
        tenant.weight = share
    if clear:
        tenant.max_jobs_in_flight = None
        tenant.max_spend_per_day_usd = None
    if jobs is not None:
        tenant.max_jobs_in_flight = jobs
    if spend is not None:
        tenant.max_spend_per_day_usd = spend
    session.flush()
    session.refresh(tenant)
    return tenant


# -- tokens ---------------------------------------------------------------------------------------------


def create_token(session: Session, tenant_name: str, *, operator: bool = False) -> NewToken:
    """Make a token for the tenant (created if new). The secret is in the result and nowhere else.
    An ``operator`` token reads every tenant's work."""
    tenant = get_or_create(session, tenant_name)
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    row = ApiToken(tenant_id=tenant.id, prefix=prefix, secret_sha256=_sha256(secret), created_at=utcnow(),
                   operator=operator)
    session.add(row)
    session.flush()
    return NewToken(id=row.id, tenant=tenant.name, prefix=prefix, token=f"sy_{prefix}_{secret}",
                    created_at=row.created_at, operator=operator)


def list_tokens(session: Session, tenant_name: str | None = None) -> list[TokenInfo]:
    stmt = select(ApiToken, Tenant.name).join(Tenant, Tenant.id == ApiToken.tenant_id).order_by(ApiToken.id)
    if tenant_name is not None:
        stmt = stmt.where(Tenant.id == require(session, tenant_name).id)
    return [TokenInfo(t.id, name, t.prefix, t.created_at, t.revoked_at, t.operator)
            for t, name in session.execute(stmt)]


def revoke_token(session: Session, tenant_name: str, prefix: str) -> TokenInfo:
    """Revoke the tenant's token with this prefix (a whole token is accepted too). Idempotent."""
    match = TOKEN_RE.fullmatch(prefix)
    if match:
        prefix = match.group(1)
    elif not PREFIX_RE.fullmatch(prefix):
        raise InvalidInput(f"{quoted(prefix)} is not a token prefix (12 hex digits, as `switchyard tokens list` "
                            f"shows them) or a whole token")
    tenant = require(session, tenant_name)
    row = session.scalar(select(ApiToken).where(ApiToken.tenant_id == tenant.id, ApiToken.prefix == prefix))
    if row is None:
        raise NotFound(f"tenant {tenant_name!r} has no token with prefix {prefix!r}")
    if row.revoked_at is None:
        session.execute(update(ApiToken).where(ApiToken.id == row.id, ApiToken.revoked_at.is_(None))
                        .values(revoked_at=utcnow()))
        session.refresh(row)
    return TokenInfo(row.id, tenant.name, row.prefix, row.created_at, row.revoked_at, row.operator)


def authenticate(session: Session, token: str) -> Caller | None:
    """The caller a token stands for, or None if it is malformed, unknown or revoked."""
    match = TOKEN_RE.fullmatch(token)
    if match is None:
        return None
    prefix, secret = match.groups()
    row = session.execute(
        select(ApiToken.secret_sha256, ApiToken.revoked_at, ApiToken.operator, Tenant.id, Tenant.name)
        .join(Tenant, Tenant.id == ApiToken.tenant_id).where(ApiToken.prefix == prefix)
    ).first()
    # Hash and compare even when the prefix is unknown, so timing does not tell which prefixes exist.
    expected = row.secret_sha256 if row is not None else "0" * 64
    ok = hmac.compare_digest(_sha256(secret), expected)
    if row is None or not ok or row.revoked_at is not None:
        return None
    return Caller(tenant_id=row.id, tenant=row.name, token_prefix=prefix, operator=row.operator)


# -- limits ----------------------------------------------------------------------------------------------


def jobs_in_flight(session: Session, tenant_id: int) -> int:
    """The tenant's jobs accepted and not finished: queued or in a stage."""
    return session.scalar(
        select(func.count()).select_from(Job).join(Batch, Batch.id == Job.batch_id)
        .where(Batch.tenant_id == tenant_id, Job.status.not_in(list(TERMINAL)))
    ) or 0


def day_start(now: datetime) -> datetime:
    return datetime.combine(now.date(), time(0), tzinfo=now.tzinfo)


def spend_today(session: Executor, tenant_id: int, *, now: datetime | None = None) -> Decimal:
    """What the tenant's model calls have cost since 00:00 UTC."""
    since = day_start(now or utcnow())
    total = session.scalar(
        select(func.coalesce(func.sum(ModelCall.cost_usd), 0))
        .join(Job, Job.id == ModelCall.job_id).join(Batch, Batch.id == Job.batch_id)
        .where(Batch.tenant_id == tenant_id, ModelCall.started_at >= since)
    )
    return Decimal(total or 0)


def lock(session: Session, tenant_id: int) -> Tenant:
    """Lock the tenant's row for the rest of the transaction: a tenant's submissions then check
    their limits one at a time, so two at once cannot both squeeze under a limit.

    FOR NO KEY UPDATE, not FOR UPDATE: by the time this is called a submission has inserted its
    batch, and the foreign key check on that insert holds FOR KEY SHARE on this row. FOR UPDATE
    conflicts with another submission's key-share lock, so two new batches at once each waited for
    the other and Postgres aborted all but one. FOR NO KEY UPDATE conflicts only with itself (and
    stronger), which is all the limit check needs."""
    tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} does not exist")
    return tenant


def check_spend(session: Session, tenant: Tenant, *, now: datetime | None = None) -> None:
    if tenant.max_spend_per_day_usd is None:
        return
    if tenant.max_spend_per_day_usd == 0:
        raise LimitExceeded(f"tenant {tenant.name!r} accepts no new jobs: its daily spend limit is $0")
    now = now or utcnow()
    spent = spend_today(session, tenant.id, now=now)
    if spent >= tenant.max_spend_per_day_usd:
        resume = day_start(now) + timedelta(days=1)
        raise LimitExceeded(
            f"tenant {tenant.name!r} has spent ${spent:.4f} today (UTC), at or over its daily spend limit of "
            f"${tenant.max_spend_per_day_usd:.4f}; submissions are accepted again from {resume:%Y-%m-%d %H:%M} UTC",
            retry_after_s=max(1, int((resume - now).total_seconds())),
        )


def check_in_flight(session: Session, tenant: Tenant, *, new_jobs: int) -> None:
    """Called after the new jobs are written, inside the same transaction: they are counted."""
    if tenant.max_jobs_in_flight is None or new_jobs == 0:
        return
    if tenant.max_jobs_in_flight == 0:
        raise LimitExceeded(f"tenant {tenant.name!r} accepts no new jobs: its limit of jobs in flight is 0")
    total = jobs_in_flight(session, tenant.id)
    if total > tenant.max_jobs_in_flight:
        raise LimitExceeded(
            f"tenant {tenant.name!r} would have {total:,} jobs in flight with these {new_jobs:,} new ones, over its "
            f"limit of {tenant.max_jobs_in_flight:,} ({total - new_jobs:,} already queued or running); retry when "
            f"some have finished",
            retry_after_s=30,
        )


def admit(session: Session, tenant_id: int, *, batch_id: int, new_jobs: int) -> None:
    """The check a tenant's submission passes inside its writing transaction, after its jobs are
    written and before the commit, whether it came over the API or from `switchyard enqueue
    --tenant` (``enqueue_items`` calls it for every enqueue with a tenant). It sees the
    submission's own rows, and the tenant's row lock makes its submissions take turns. (A batch
    cancelled before the submission began was refused by ``get_or_create_batch``; this catches one
    cancelled while it was being written.) The day's spend is checked before the input is read,
    with ``check_spend``, so that a tenant over it is refused before it sends a large body."""
    tenant = lock(session, tenant_id)
    if new_jobs == 0:
        return
    cancelled = session.scalar(select(Batch.cancelled_at).where(Batch.id == batch_id))
    if cancelled is not None:
        raise BatchCancelled(f"batch {batch_id} was cancelled at {cancelled:%Y-%m-%d %H:%M:%S} UTC and takes no "
                             f"new jobs; submit to a new batch")
    check_in_flight(session, tenant, new_jobs=new_jobs)
