"""Budgets over HTTP: a batch's budget set at submission and changed later, its paused jobs resumed,
and bad budgets and resumes refused in one sentence with nothing changed (pipeline.flow.budgets)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch, Job, JobStatus
from tests.api.conftest import MakeToken, Server, job


def test_a_budget_is_set_at_submission_changed_and_shown(server: Server, make_token: MakeToken,
                                                         api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        made = c.post("/v1/batches", params={"name": "capped", "budget_usd": "0.5"}, json=[job(1), job(2)])
        assert made.status_code == 201, made.text
        batch_id = made.json()["batch_id"]
        raised = c.post(f"/v1/batches/{batch_id}/budget", params={"usd": "2.25"})
        assert raised.status_code == 200, raised.text
        assert raised.json() == {"batch_id": batch_id, "batch": "capped", "budget_usd": "2.25000000",
                                 "spent_usd": "0.00000000", "reserved_usd": "0", "paused": 0, "exhausted": False}
        # A job paused for the budget is resumed by hand: at the dispatcher's next tick, whatever the room.
        with api_sessions() as s:
            s.execute(update(Job).where(Job.batch_id == batch_id, Job.key == "k-1")
                      .values(status=JobStatus.PAUSED, paused_reason="budget", paused_from="working",
                              paused_need_usd=Decimal("3")))
            s.commit()
        # /metrics counts it, with no tenant's or batch's name in any label.
        scraped = {line.split()[0]: float(line.split()[1]) for line in c.get("/metrics").text.splitlines()
                   if line.startswith("switchyard_budget_")}
        assert scraped["switchyard_budget_paused_jobs"] >= 1 and scraped["switchyard_budget_exhausted_batches"] >= 1
        assert set(scraped) == {"switchyard_budget_reserved_usd", "switchyard_budget_calls_reserved",
                                "switchyard_budget_paused_jobs", "switchyard_budget_exhausted_batches"}
        shown = c.post(f"/v1/batches/{batch_id}/resume")
        assert shown.status_code == 200 and shown.json()["paused"] == 1 and shown.json()["exhausted"] is True
    with api_sessions() as s:
        assert s.scalar(select(Batch.budget_usd).where(Batch.id == batch_id)) == Decimal("2.25")
        assert s.scalar(select(Job.paused_need_usd).where(Job.batch_id == batch_id, Job.key == "k-1")) == 0


@pytest.mark.parametrize(("value", "said"), [("-1", "must be 0 or more"), ("lots", "is not a number of dollars"),
                                             ("1e40", "must be under")])
def test_bad_budgets_are_refused_and_change_nothing(server: Server, make_token: MakeToken,
                                                    api_sessions: sessionmaker[Session], tenant_name: str,
                                                    value: str, said: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        bad = c.post("/v1/batches", params={"name": "never", "budget_usd": value}, json=[job(1)])
        assert bad.status_code == 422 and "query parameter 'budget_usd'" in bad.json()["detail"], bad.text
        assert said in bad.json()["detail"]
        ok = c.post("/v1/batches", params={"name": "kept", "budget_usd": "1"}, json=[job(1)])
        batch_id = ok.json()["batch_id"]
        again = c.post(f"/v1/batches/{batch_id}/budget", params={"usd": value})
        assert again.status_code == 422 and said in again.json()["detail"], again.text
        idle = c.post(f"/v1/batches/{batch_id}/resume")
        assert idle.status_code == 422 and idle.json()["detail"] == (
            "batch 'kept' has no paused jobs, so there is nothing to resume")
    with api_sessions() as s:
        assert s.scalar(select(Batch.id).join(Job, Job.batch_id == Batch.id).where(Batch.name == "never")) is None
        assert s.scalar(select(Batch.budget_usd).where(Batch.id == batch_id)) == 1
