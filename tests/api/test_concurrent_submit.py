"""One tenant submitting many things at once: no submission is lost to a deadlock between them,
the limits still hold exactly, and a deadlock that does happen is retried rather than answered as
an outage."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx2 as httpx
import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.db import transaction
from pipeline.models import Batch, Job, JobKind, JobStatus, ModelCall, Stage, Tenant, utcnow
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


def _wait_for_lock_wait(api_sessions: sessionmaker[Session], timeout_s: float = 15) -> None:
    """Until another session of this database is waiting for a row lock."""
    deadline = time.monotonic() + timeout_s
    with api_sessions() as s:
        while s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'")) == 0:
            assert time.monotonic() < deadline, "the submission never waited for the tenant's lock"
            s.rollback()  # a fresh snapshot of pg_stat_activity
            time.sleep(0.05)


def test_a_deadlock_is_retried_not_called_an_outage(server: Server, make_token: MakeToken,
                                                    api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    """Make a real deadlock: this test holds the tenant's lock, the submission (having written its
    new batch) waits for it, and then this test waits for that batch's name. Postgres breaks the
    cycle by aborting the submission, which started waiting first; it must then run again and
    succeed once this test lets go."""
    token = make_token(tenant_name)
    tid = tenant_id(api_sessions, tenant_name)
    log_start = len(server.logs())

    def submit() -> httpx.Response:
        with server.client(token) as c:
            return c.post("/v1/jobs", params={"batch": "dl"}, json=job(0))

    with api_sessions() as blocker, ThreadPoolExecutor(1) as pool:
        # The submission's wait, not this one, is the one Postgres picks to abort.
        blocker.execute(text("SET LOCAL deadlock_timeout = '60s'"))
        blocker.execute(text("SELECT 1 FROM tenants WHERE id = :id FOR NO KEY UPDATE"), {"id": tid})
        answer = pool.submit(submit)
        _wait_for_lock_wait(api_sessions)
        blocker.execute(text("INSERT INTO batches (tenant_id, name, created_at) VALUES (:id, 'dl', now()) "
                             "ON CONFLICT DO NOTHING"), {"id": tid})
        blocker.rollback()
        r = answer.result(30)
    assert r.status_code == 201, r.text
    assert jobs_of(api_sessions, tenant_name) == 1
    assert "enqueue into batch 'dl': the database aborted it (DeadlockDetected); retrying" in server.logs()[log_start:]


def _job_row(batch_id: int, key: str) -> dict[str, object]:
    return {"batch_id": batch_id, "key": key, "kind": JobKind.CLASSIFY, "payload": {"text": "x"},
            "status": JobStatus.QUEUED, "created_at": utcnow(), "updated_at": utcnow()}


def test_a_deadlock_on_job_keys_is_retried(server: Server, make_token: MakeToken,
                                          api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    """Two writers putting the same keys into one batch in different orders: this test writes k-1
    and holds it, the submission writes k-0 and waits for k-1, then this test waits for k-0. The
    driver raises this one bare (the jobs are written on its own connection), and it is retried
    all the same."""
    token = make_token(tenant_name)
    log_start = len(server.logs())
    with server.client(token) as c:
        batch_id = c.post("/v1/batches", params={"name": "dlk"}, json=[job(9)]).json()["batch_id"]

    def submit() -> httpx.Response:
        with server.client(token) as c:
            return c.post("/v1/batches", params={"name": "dlk"}, json=[job(0), job(1)])

    with api_sessions() as blocker, ThreadPoolExecutor(1) as pool:
        blocker.execute(text("SET LOCAL deadlock_timeout = '60s'"))
        blocker.execute(insert(Job).values(_job_row(batch_id, "k-1")))
        answer = pool.submit(submit)
        _wait_for_lock_wait(api_sessions)
        blocker.execute(insert(Job).values(_job_row(batch_id, "k-0")))
        blocker.rollback()
        r = answer.result(30)
    assert r.status_code == 201, r.text
    assert r.json()["accepted"] == 2
    assert jobs_of(api_sessions, tenant_name) == 3
    assert "enqueue into batch 'dlk': the database aborted it (DeadlockDetected); retrying" in server.logs()[log_start:]


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_deadlocked_cli_enqueue_is_retried_or_says_so(server: Server, api_sessions: sessionmaker[Session],
                                                       tmp_path: Path, skip_invalid: bool) -> None:
    """The same for `switchyard enqueue`: this test writes key k-1 into the batch and holds it, the
    enqueue writes k-0 and waits for k-1, then this test waits for k-0. Written in one transaction
    (the default), the enqueue runs again and succeeds; with --skip-invalid, committing chunk by
    chunk, it is not retried, and says what happened rather than blaming the database's address."""
    name = f"cli-dl-{skip_invalid}"
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(job(i)) + "\n" for i in range(2)))
    with transaction(api_sessions) as s:
        batch_id = s.scalar(insert(Batch).values(name=name, created_at=utcnow()).returning(Batch.id))

    with api_sessions() as blocker, ThreadPoolExecutor(1) as pool:
        blocker.execute(text("SET LOCAL deadlock_timeout = '60s'"))
        blocker.execute(insert(Job).values(_job_row(batch_id, "k-1")))
        args = ["enqueue", str(path), "--batch", name, *(["--skip-invalid"] if skip_invalid else [])]
        answer = pool.submit(server.cli, *args)
        _wait_for_lock_wait(api_sessions)
        blocker.execute(insert(Job).values(_job_row(batch_id, "k-0")))
        blocker.rollback()
        done = answer.result(60)
    with api_sessions() as s:
        written = s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id))
    if skip_invalid:
        assert done.returncode == 2
        assert done.stderr.startswith("error: the database aborted this command because it conflicted with "
                                      "concurrent work (DeadlockDetected); run it again"), done.stderr
        assert written == 0
    else:
        assert done.returncode == 0, done.stderr
        assert written == 2
