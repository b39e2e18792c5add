"""A batch submitted over HTTP runs through real worker processes to the end, and its story and
results come back over HTTP."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.fake_claude import FakeClaude
from tests.api.conftest import Server
from tests.cluster import Cluster

LABELS = ["billing", "bug", "account", "other"]


def jobs() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i in range(24):
        kind = ("classify", "extract", "draft", "generate")[i % 4]
        hint = ["", "[fake:difficulty=hard]", "[fake:invalid=sonnet]", ""][i % 4 if i % 3 else 0]
        job: dict[str, object] = {"key": f"h-{i}", "kind": kind, "metadata": {"n": i}}
        if kind == "classify":
            job |= {"text": f"Ticket {i}: charged twice {hint}", "labels": LABELS}
        elif kind == "extract":
            job |= {"text": f"Receipt {i}: Dana Smith paid 42.50 {hint}",
                    "schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}
        elif kind == "draft":
            job |= {"instructions": f"Apologise for order {i} {hint}"}
        else:
            job |= {"prompt": f"Two lines about item {i} {hint}"}
        out.append(job)
    out.append({"key": "doomed", "kind": "generate", "prompt": "nonsense [fake:invalid=all]"})
    return out


@pytest.mark.e2e
def test_http_batch_runs_to_the_end(cluster_server: Server, broker_url: str, fake_claude: FakeClaude,
                                    tmp_path_factory: pytest.TempPathFactory, tenant_name: str) -> None:
    server = cluster_server
    cluster = Cluster(database_url=server.database_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                      workdir=tmp_path_factory.mktemp("api-cluster"))
    body = "".join(json.dumps(j) + "\n" for j in jobs()).encode()
    with server.client(server.make_token(tenant_name)) as c:
        sub = c.post("/v1/batches", params={"name": "over-http"}, content=body,
                     headers={"Content-Type": "application/x-ndjson"})
        assert sub.status_code == 201, sub.text
        batch_id = sub.json()["batch_id"]
        assert sub.json()["accepted"] == 25
        try:
            cluster.start_all(concurrency=4)
            # Follow it as a client would: poll the batch until it says it has finished.
            deadline = time.monotonic() + 180
            while not (summary := c.get(f"/v1/batches/{batch_id}").json())["finished"]:
                assert time.monotonic() < deadline, f"not finished: {summary}\n{cluster.logs()}"
                time.sleep(0.5)
            # Queue status is the operator's view: every queue with its workers online.
            queue = c.get("/v1/queue").json()
            assert [q["queue"] for q in queue["queues"]] == ["triage", "sonnet", "opus", "validate"]
            assert all(q["workers"] >= 1 for q in queue["queues"]), queue
        finally:
            cluster.stop()

        assert summary["jobs"] == summary["done"] == 25
        assert summary["by_status"] == {"failed": 1, "succeeded": 24}
        assert float(summary["cost_usd"]) > 0

        lines = c.get(f"/v1/batches/{batch_id}/results")
        assert lines.status_code == 200
        assert lines.headers["content-type"].startswith("application/x-ndjson")
        results = [json.loads(line) for line in lines.text.splitlines()]
        assert [r["key"] for r in results] == [j["key"] for j in jobs()]  # in submission order
        for r in results:
            if r["key"] == "doomed":
                assert r["status"] == "failed"
                assert "validation failed" in r["error"]
            else:
                assert r["status"] == "succeeded"
                assert r["output"] is not None
                assert r["tier"] in ("sonnet", "opus")

        # The routing story of a job Sonnet got wrong: triaged, worked, failed validation, escalated.
        page = c.get("/v1/jobs", params={"batch": "over-http", "limit": 100}).json()
        by_key = {j["key"]: j for j in page["jobs"]}
        assert len(by_key) == 25
        assert page["next_cursor"] is None
        story = c.get(f"/v1/jobs/{by_key['h-2']['id']}").json()
        assert "[fake:invalid=sonnet]" in json.dumps(story["payload"])
        assert story["job"]["status"] == "succeeded"
        assert story["job"]["tier"] == "opus"
        kinds = [r["reason_kind"] for r in story["routing"]]
        assert kinds[0] in ("triage", "pinned")
        assert story["calls"]
        assert story["events"][-1]["to_status"] == "succeeded"
        if story["routing"][0]["to_tier"] == "sonnet":
            assert "escalation" in kinds
            assert any(not v["ok"] for v in story["validations"])
        assert story["metadata"] == {"n": 2}

        stats = c.get("/v1/stats", params={"batch_id": batch_id}).json()
        assert stats["jobs"] == 25
        assert sum(t["calls"] for t in stats["tiers"]) == sum(len(c.get(f"/v1/jobs/{j['id']}").json()["calls"])
                                                              for j in page["jobs"])
        queue = c.get("/v1/queue").json()
        assert queue["tenant"]["jobs_in_flight"] == 0
