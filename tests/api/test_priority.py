"""A batch's priority over the HTTP API: kept, shown with the batch, and a value out of range
refused in one sentence with nothing written."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch
from tests.api.conftest import MakeToken, Server, job


def test_a_batch_priority_is_kept_shown_and_refused_outside_0_to_9(server: Server, make_token: MakeToken,
                                                                  api_sessions: sessionmaker[Session],
                                                                  tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        bad = c.post("/v1/batches?name=p-bad&priority=10", json=[job(1)])
        assert bad.status_code == 422, bad.text
        assert "query parameter 'priority' must be a whole number from 0 to 9, not 10" in bad.text
        ok = c.post("/v1/batches?name=p-urgent&priority=9", json=[job(1)])
        assert ok.status_code == 201, ok.text
        shown = c.get(f"/v1/batches/{ok.json()['batch_id']}")
        assert shown.json()["priority"] == 9
        # Given again with a bad value for the existing batch: refused, and the batch keeps its own.
        assert c.post("/v1/batches?name=p-urgent&priority=-1", json=[job(2)]).status_code == 422
    with api_sessions() as s:
        assert s.scalar(select(Batch.priority).where(Batch.id == ok.json()["batch_id"])) == 9
        assert s.scalar(select(Batch.id).where(Batch.name == "p-bad")) is None
