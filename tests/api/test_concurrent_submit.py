"""One tenant submitting many things at once: no submission is lost to a deadlock between them,
and the limits still hold exactly."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx2 as httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.db import transaction
from pipeline.models import Batch, Job, ModelCall, Stage, Tenant, utcnow
from tests.api.conftest import MakeToken, Server, job

PARALLEL = 10


def in_parallel(server: Server, token: str, request: Callable[[httpx.Client, int], httpx.Response],
                n: int = PARALLEL) -> list[httpx.Response]:
    """``request(client, i)`` for i in range(n), each on a client of its own, released together."""
    start = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with server.client(token) as c:
            start.wait(10)
            return request(c, i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def tenant_id(api_sessions: sessionmaker[Session], name: str) -> int:
    with api_sessions() as s:
        return s.scalar(select(Tenant.id).where(Tenant.name == name))  # type: ignore[return-value]


def jobs_of(api_sessions: sessionmaker[Session], name: str) -> int:
    with api_sessions() as s:
        return s.scalar(select(func.count()).select_from(Job).join(Batch, Batch.id == Job.batch_id)
                        .join(Tenant, Tenant.id == Batch.tenant_id).where(Tenant.name == name)) or 0


def test_parallel_submissions_to_new_batches_all_succeed(server: Server, make_token: MakeToken,
                                                        api_sessions: sessionmaker[Session],
                                                        tenant_name: str) -> None:
    token = make_token(tenant_name)
    log_start = len(server.logs())
    singles = in_parallel(server, token, lambda c, i: c.post("/v1/jobs", params={"batch": f"dls-{i}"}, json=job(i)))
    batches = in_parallel(server, token, lambda c, i: c.post("/v1/batches", params={"name": f"dlb-{i}"},
                                                            json=[job(k) for k in range(3)]))
    assert [r.status_code for r in singles + batches] == [201] * (2 * PARALLEL), [r.text for r in singles + batches]
    assert jobs_of(api_sessions, tenant_name) == PARALLEL * 4
    assert "deadlock" not in server.logs()[log_start:].lower()


def test_limits_hold_exactly_under_parallel_submissions(server: Server, make_token: MakeToken,
                                                       api_sessions: sessionmaker[Session],
                                                       tenant_name: str) -> None:
    token = make_token(tenant_name)
    with transaction(api_sessions) as s:
        tenants.set_limits(s, tenant_name, max_jobs_in_flight=4, max_spend_per_day_usd=Decimal("0.50"))

    def submit(c: httpx.Client, i: int) -> httpx.Response:
        return c.post("/v1/jobs", params={"batch": f"lim-{i}"}, json=job(i))

    # Under the spend limit: exactly as many jobs as the in-flight limit allows get in.
    codes = sorted(r.status_code for r in in_parallel(server, token, submit))
    assert codes == [201] * 4 + [429] * (PARALLEL - 4)
    assert jobs_of(api_sessions, tenant_name) == 4

    # Over the spend limit: every submission is refused, and none writes anything.
    with transaction(api_sessions) as s:
        tenants.set_limits(s, tenant_name, max_jobs_in_flight=None, max_spend_per_day_usd=None)
        job_id = s.scalar(select(Job.id).join(Batch).where(Batch.tenant_id == tenant_id(api_sessions, tenant_name)))
        s.add(ModelCall(job_id=job_id, stage=Stage.WORK, tier="opus", model="m", attempt=1, outcome="ok",
                        input_tokens=1, output_tokens=1, cache_creation_input_tokens=0, cache_read_input_tokens=0,
                        cost_usd=Decimal("0.50"), started_at=utcnow()))
        tenants.set_limits(s, tenant_name, max_jobs_in_flight=None, max_spend_per_day_usd=Decimal("0.50"))
    refused = in_parallel(server, token, lambda c, i: c.post("/v1/jobs", params={"batch": f"over-{i}"}, json=job(i)))
    assert [r.status_code for r in refused] == [429] * PARALLEL
    assert all("daily spend limit of $0.5000" in r.json()["detail"] for r in refused)
    assert jobs_of(api_sessions, tenant_name) == 4
