"""One call warms a cached prompt prefix before the calls that share it go out.

A call whose prompt ends its shared part with a ``cache_control`` breakpoint writes that prefix to
the model's cache, and the calls after it read it at a tenth of the input price; but an entry is
readable only once the answer that wrote it has begun, so calls fired together all miss, and each
writes the prefix again at the write price (1.25x input for 5 minutes, 2x for an hour). A task's
jobs meet several such prefixes (its triage prompt, its work prompt at each tier, its format
check), each when the first of its jobs gets there, so the gate stands before every call with a
breakpoint (pipeline.flow.stages._call), not at the dispatcher:

- a prefix known to be warm (``warm_until`` ahead): the call goes;
- else one call, across every worker and process, takes the warm-up lease by a conditional update
  and goes; its answer marks the prefix warm for the tier's TTL. Any answer does, even one with no
  cache activity at all (a prefix under the model's real minimum): waiting would gain nothing;
- the others hand their job back for a short wait (``Admission.wait_s``) and ask again.

The lease lapses after ``lease_s``: a warmer that died or is slow holds the others that long at
most, and the next caller then takes it over (one more write, not a stampede). A warmer whose
call fails gives the lease up at once. Every answer pushes ``warm_until`` on, as a read restarts
the real entry's TTL, but writes it only once less than half the TTL is left; an in-process memo
of what the database holds spares a read per call while the prefix is warm.

The state is a row of ``cache_warmups`` per model and prefix (Postgres, or the demo's SQLite).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, and_, case, or_, select, update
from sqlalchemy.sql import ColumnElement

from pipeline.db import insert_or_skip
from pipeline.models import CacheWarmup

# How long a warm-up lease holds the other callers of its prefix: longer than most calls take,
# short enough that a dead warmer costs its prefix's jobs half a minute (SWITCHYARD_CACHE_WARMUP_LEASE_S).
DEFAULT_LEASE_S = 30.0
# A waiting call asks again after as long as the warm-up has already taken, within these bounds:
# a fast warmer's prefix is read soon after its answer, a slow one's is not asked after every second.
MIN_WAIT_S = 0.5
MAX_WAIT_S = 10.0
_MEMO_KEPT = 4096

_T = cast(Table, CacheWarmup.__table__)
_C = _T.c


@dataclass(frozen=True)
class PrefixKey:
    model: str
    digest: str  # hex SHA-256 of the entry's TTL and the bytes up to the breakpoint


def prefix_key(model: str, *, system: str, ttl: str, output_schema: dict[str, Any] | None = None) -> PrefixKey:
    """The cache entry a call with a breakpoint at the end of ``system`` reads or writes: the model
    caches per model and exact prefix; the TTL is part of the key, as a 1-hour entry is written
    (and priced) apart from a 5-minute one; and so is the output format asked for, since changing
    it invalidates the cache."""
    fmt = json.dumps(output_schema, sort_keys=True, separators=(",", ":")) if output_schema is not None else ""
    digest = hashlib.sha256(b"\0".join([ttl.encode(), fmt.encode(), system.encode()])).hexdigest()
    return PrefixKey(model, digest)


@dataclass(frozen=True)
class Admission:
    """What the gate says to a call through ``key``: go (``lease`` set if this call is the one
    warming the prefix, and must report how it ended), or wait ``wait_s`` seconds and ask again."""

    key: PrefixKey
    go: bool
    lease: str | None = None
    wait_s: float = 0.0


def _aware(at: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return at.replace(tzinfo=UTC) if at is not None and at.tzinfo is None else at


def _is(key: PrefixKey) -> ColumnElement[bool]:
    return and_(_C.model == key.model, _C.prefix_sha256 == key.digest)


def _cold_and_free(now: datetime) -> ColumnElement[bool]:
    """No warm entry, and no live lease: the next caller may take the lease."""
    return and_(or_(_C.warm_until.is_(None), _C.warm_until <= now),
                or_(_C.lease_until.is_(None), _C.lease_until <= now))


class WarmupGate:
    """One per process: the database holds the state, this the memo of what it last said."""

    def __init__(self, *, lease_s: float = DEFAULT_LEASE_S, min_wait_s: float = MIN_WAIT_S,
                 max_wait_s: float = MAX_WAIT_S) -> None:
        self.lease_s = lease_s
        self.min_wait_s = min_wait_s
        self.max_wait_s = max(min_wait_s, max_wait_s)
        # key -> warm_until as the database last held it (read or written here). Never ahead of
        # it, so another process never finds a prefix cold that this one would call warm.
        self._memo: dict[PrefixKey, datetime] = {}

    def admit(self, conn: Connection, key: PrefixKey, *, now: datetime) -> Admission:
        known = self._memo.get(key)
        if known is not None and known > now:
            return Admission(key, go=True)
        row = self._read(conn, key)
        if row is None or self._free(row, now):
            token = uuid.uuid4().hex
            lease = {"lease_token": token, "leased_at": now, "lease_until": now + timedelta(seconds=self.lease_s)}
            # One statement, so two callers cannot both take it: the first to come inserts the row
            # or updates it where it is still cold and free; the other's conflict, or its update
            # re-checked against the row the first committed, finds it leased and returns nothing.
            take = (insert_or_skip(conn, _T).values(model=key.model, prefix_sha256=key.digest, **lease)
                    .on_conflict_do_update(index_elements=[_C.model, _C.prefix_sha256], set_=lease,
                                           where=_cold_and_free(now))
                    .returning(_C.lease_token))
            if conn.execute(take).first() is not None:
                return Admission(key, go=True, lease=token)
            row = self._read(conn, key)
        if row is None:  # never: rows are not deleted; but a wait is the safe answer
            return Admission(key, go=False, wait_s=self.min_wait_s)
        warm_until = _aware(row.warm_until)
        if warm_until is not None and warm_until > now:
            self._remember(key, warm_until)
            return Admission(key, go=True)
        return Admission(key, go=False, wait_s=self._wait(row, now))

    def due(self, key: PrefixKey, *, now: datetime, ttl_s: float) -> bool:
        """Whether an answer should write ``warm_until`` (``warmed``): only once less than half the
        TTL is left of what the database holds, so that a warm prefix costs no write per call."""
        known = self._memo.get(key)
        return known is None or (known - now).total_seconds() < ttl_s / 2

    def warmed(self, conn: Connection, key: PrefixKey, *, until: datetime) -> None:
        """A call through the prefix was answered: the cache holds it until ``until`` (the call's
        start plus the TTL: the entry's life restarts when it is read or written, no later). Any
        lease goes: a warm prefix needs no warmer."""
        conn.execute(update(_T).where(_is(key)).values(
            warm_until=case((or_(_C.warm_until.is_(None), _C.warm_until < until), until), else_=_C.warm_until),
            lease_token=None, leased_at=None, lease_until=None))
        self._remember(key, until)

    def release(self, conn: Connection, admission: Admission) -> None:
        """The warmer's call failed (no answer): the next caller takes the lease at once."""
        conn.execute(update(_T).where(_is(admission.key), _C.lease_token == admission.lease)
                     .values(lease_token=None, leased_at=None, lease_until=None))

    # -- helpers ---------------------------------------------------------------------------------

    def _read(self, conn: Connection, key: PrefixKey) -> Row[Any, Any, Any] | None:
        return conn.execute(select(_C.warm_until, _C.leased_at, _C.lease_until).where(_is(key))).first()

    @staticmethod
    def _free(row: Row[Any, Any, Any], now: datetime) -> bool:
        warm_until, lease_until = _aware(row.warm_until), _aware(row.lease_until)
        return (warm_until is None or warm_until <= now) and (lease_until is None or lease_until <= now)

    def _wait(self, row: Row[Any, Any, Any], now: datetime) -> float:
        """As long as the warm-up has taken so far (a backoff without a counter), but no later
        than its lease lapses, within [min_wait_s, max_wait_s]."""
        leased_at, lease_until = _aware(row.leased_at), _aware(row.lease_until)
        if leased_at is None or lease_until is None:
            return self.min_wait_s
        age = (now - leased_at).total_seconds()
        left = (lease_until - now).total_seconds()
        return max(self.min_wait_s, min(age, left, self.max_wait_s))

    def _remember(self, key: PrefixKey, until: datetime) -> None:
        if len(self._memo) >= _MEMO_KEPT and key not in self._memo:
            self._memo.clear()
        self._memo[key] = until
