"""/v1/stats shows, per tier and over all, the cache tokens, the cache hit rate and what caching saved."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Job, ModelCall, Stage
from tests.api.conftest import MakeToken, Server, job


def test_stats_show_the_cache_figures(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                                      tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        sub = c.post("/v1/batches", params={"name": "cached"}, json=[job(i) for i in range(2)])
        assert sub.status_code == 201, sub.text
        batch_id = sub.json()["batch_id"]
        # Two Sonnet calls ($2 per million in) as a cached task makes them: the first writes a
        # 4,000-token prefix, the second reads it; 100 tokens of each are the job's own.
        with api_sessions() as s:
            ids = s.scalars(Job.__table__.select().with_only_columns(Job.id).where(Job.batch_id == batch_id)).all()
            s.execute(update(Job).where(Job.batch_id == batch_id).values(tier="sonnet"))
            now = datetime.now(UTC)
            for job_id, (written, read, cost) in zip(ids, [(4000, 0, "0.0103"), (0, 4000, "0.0011")], strict=True):
                s.add(ModelCall(job_id=job_id, stage=Stage.WORK, tier="sonnet", model="claude-sonnet-5-5", attempt=1,
                                delivery=1, outcome="ok", input_tokens=100, output_tokens=10,
                                cache_creation_input_tokens=written, cache_read_input_tokens=read,
                                cost_usd=Decimal(cost), latency_ms=50.0, started_at=now))
            s.commit()
        stats = c.get("/v1/stats", params={"batch_id": batch_id}).json()
    sonnet = next(t for t in stats["tiers"] if t["tier"] == "sonnet")
    assert (sonnet["cache_creation_input_tokens"], sonnet["cache_read_input_tokens"]) == (4000, 4000)
    assert sonnet["cache_hit_rate"] == stats["cache_hit_rate"] == 4000 / 8200
    # 8,000 cache tokens as plain input: $0.016; as a write and a read: 4,000 x 1.25 + 4,000 x 0.1 of that.
    assert Decimal(sonnet["cache_saving_usd"]) == Decimal(stats["cache_saving_usd"]) == Decimal("0.0052")
    haiku = next(t for t in stats["tiers"] if t["tier"] == "haiku")
    assert (haiku["cache_hit_rate"], Decimal(haiku["cache_saving_usd"])) == (None, 0)
