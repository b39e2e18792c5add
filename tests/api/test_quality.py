"""`GET /v1/quality`: shadow evaluation's figures for the caller's own jobs only, and a batch's
shadow rate set at submission."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch, Job, JobStatus, ShadowEvaluation, ShadowStatus, utcnow
from tests.api.conftest import MakeToken, Server, job


def test_a_batch_shadow_rate_is_kept_and_refused_outside_0_to_1(server: Server, make_token: MakeToken,
                                                                 api_sessions: sessionmaker[Session],
                                                                 tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        bad = c.post("/v1/batches?name=q-bad&shadow_rate=1.5", json=[job(1)])
        assert bad.status_code == 422, bad.text
        ok = c.post("/v1/batches?name=q-rate&shadow_rate=0.25", json=[job(1)])
        assert ok.status_code == 201, ok.text
    with api_sessions() as s:
        assert s.scalar(select(Batch.shadow_rate).where(Batch.id == ok.json()["batch_id"])) == 0.25
        assert s.scalar(select(Batch.id).where(Batch.name == "q-bad")) is None


def test_quality_covers_the_callers_jobs_only(server: Server, make_token: MakeToken,
                                              api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    owner, other = make_token(tenant_name), make_token(tenant_name + "-other")
    with server.client(owner) as c:
        batch_id = c.post("/v1/batches?name=q-own", json=[job(1), job(2)]).json()["batch_id"]
        empty = c.get(f"/v1/quality?batch_id={batch_id}")
    assert empty.status_code == 200, empty.text
    assert (empty.json()["succeeded"], empty.json()["agreement"]) == (0, None)
    assert empty.json()["notes"] == ["no job has succeeded yet: there is nothing to compare"]

    # Two jobs as the pipeline leaves them: one answered by sonnet and shadowed (agreeing), one by opus.
    now = utcnow()
    with api_sessions() as s, s.begin():
        ids = s.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)).all()
        for jid, tier in zip(ids, ("sonnet", "opus"), strict=True):
            s.execute(update(Job).where(Job.id == jid).values(status=JobStatus.SUCCEEDED, tier=tier,
                                                              difficulty="easy", cost_usd=Decimal("0.01")))
        s.add(ShadowEvaluation(job_id=ids[0], status=ShadowStatus.DONE, rate=1.0, draw=0.5, routed_tier="sonnet",
                               difficulty="easy", reference_tier="opus", agreement=1.0, agreed=True,
                               cost_usd=Decimal("0.02"), created_at=now, updated_at=now))
    with server.client(owner) as c:
        mine = c.get(f"/v1/quality?batch_id={batch_id}").json()
    assert (mine["succeeded"], mine["shadowed"], mine["evaluated"], mine["agreement"]) == (2, 1, 1, 1.0)
    assert Decimal(mine["cost_usd"]) == Decimal("0.02")
    assert {(s["tier"], s["reference"]) for s in mine["strata"]} == {("sonnet", False), ("opus", True)}
    with server.client(other) as c:
        assert c.get(f"/v1/quality?batch_id={batch_id}").status_code == 404
        theirs = c.get("/v1/quality").json()
        assert (theirs["jobs"], theirs["shadowed"]) == (0, 0)
        assert c.get("/v1/quality?task=no-such-task").status_code == 404
