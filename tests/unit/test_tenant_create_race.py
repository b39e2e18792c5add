"""Two `tokens create --tenant NEW` at once: both make the tenant, neither fails on the other's
row. Real Postgres, real sessions: the second waits for the first's uncommitted insert."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.db import transaction
from pipeline.models import ApiToken, Tenant


def test_two_tokens_for_a_new_tenant_at_once(sessions: sessionmaker[Session]) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    with sessions() as first, ThreadPoolExecutor(1) as pool:
        tenants.create_token(first, name)  # its tenant row is written, not yet committed

        def second() -> tenants.NewToken:
            with transaction(sessions) as s:
                return tenants.create_token(s, name)

        other = pool.submit(second)
        deadline = time.monotonic() + 15
        with sessions() as probe:  # until the second waits on the first's row
            while not probe.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                        "AND wait_event_type = 'Lock'")):
                assert time.monotonic() < deadline
                probe.rollback()
                time.sleep(0.02)
        first.commit()
        new = other.result(15)
    assert new.tenant == name
    with sessions() as s:
        tenant_id = s.scalar(select(Tenant.id).where(Tenant.name == name))
        assert s.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.tenant_id == tenant_id)) == 2
