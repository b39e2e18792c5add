"""A tenant sees and changes only its own work: another tenant's ids answer exactly as missing
ones do."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Job, JobStatus
from tests.api.conftest import MakeToken, Server, job


def _same_as_missing(r_other: object, r_missing: object, other_id: int, missing_id: int) -> None:
    """The answer for another tenant's id is the answer for an id that does not exist."""
    assert r_other.status_code == r_missing.status_code == 404  # type: ignore[attr-defined]
    other = re.sub(rf"\b{other_id}\b", "ID", r_other.text)  # type: ignore[attr-defined]
    missing = re.sub(rf"\b{missing_id}\b", "ID", r_missing.text)  # type: ignore[attr-defined]
    assert other == missing


def test_tenant_b_cannot_touch_tenant_a(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                                        tenant_name: str) -> None:
    token_a, token_b = make_token(tenant_name + "-a"), make_token(tenant_name + "-b")
    with server.client(token_a) as a, server.client(token_b) as b:
        sub = a.post("/v1/batches", params={"name": "shared-name"}, json=[job(i) for i in range(3)])
        assert sub.status_code == 201, sub.text
        batch_a = sub.json()["batch_id"]
        job_a = a.get("/v1/jobs", params={"batch": "shared-name"}).json()["jobs"][0]["id"]
        missing = 10**12

        # Read: a job, a batch, its results; and the same for an id that does not exist.
        _same_as_missing(b.get(f"/v1/jobs/{job_a}"), b.get(f"/v1/jobs/{missing}"), job_a, missing)
        _same_as_missing(b.get(f"/v1/batches/{batch_a}"), b.get(f"/v1/batches/{missing}"), batch_a, missing)
        _same_as_missing(b.get(f"/v1/batches/{batch_a}/results"), b.get(f"/v1/batches/{missing}/results"),
                         batch_a, missing)
        _same_as_missing(b.get("/v1/stats", params={"batch_id": batch_a}),
                         b.get("/v1/stats", params={"batch_id": missing}), batch_a, missing)
        # Change: cancelling A's batch as B is a 404 and cancels nothing.
        _same_as_missing(b.post(f"/v1/batches/{batch_a}/cancel"), b.post(f"/v1/batches/{missing}/cancel"),
                         batch_a, missing)
        with api_sessions() as s:
            queued = s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_a,
                                                                          Job.status == JobStatus.QUEUED))
        assert queued == 3

        # List: B sees none of A's jobs or batches, by filter or by name.
        assert b.get("/v1/jobs").json() == {"jobs": [], "next_cursor": None}
        assert b.get("/v1/batches").json() == {"batches": []}
        assert b.get("/v1/jobs", params={"batch": "shared-name"}).status_code == 404
        assert b.get("/v1/jobs", params={"batch": str(batch_a)}).status_code == 404
        assert b.get("/v1/stats").json()["jobs"] == 0
        assert b.get("/v1/queue").json()["tenant"]["jobs_in_flight"] == 0

        # Batch names are per tenant: B's "shared-name" is a batch of its own.
        sub_b = b.post("/v1/batches", params={"name": "shared-name"}, json=[job(i) for i in range(2)])
        assert sub_b.status_code == 201
        assert sub_b.json()["accepted"] == 2
        assert sub_b.json()["batch_id"] != batch_a
        assert a.get(f"/v1/batches/{batch_a}").json()["jobs"] == 3
        assert a.get("/v1/jobs/" + str(job_a)).status_code == 200

        # A can do all of it to its own batch.
        results = a.get(f"/v1/batches/{batch_a}/results")
        assert results.status_code == 200
        assert len(results.text.splitlines()) == 3
        cancelled = a.post(f"/v1/batches/{batch_a}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["cancelled"] == 3
        assert b.get("/v1/batches").json()["batches"][0]["by_status"] == {"queued": 2}
