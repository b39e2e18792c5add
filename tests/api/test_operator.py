"""An operator's token (`switchyard tokens create --operator`) reads every tenant's jobs and batches,
in the API as in the dashboard; a tenant's token still sees only its own."""

from __future__ import annotations

import json

from tests.api.conftest import MakeToken, Server, job


def test_an_operator_token_reads_every_tenant(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    made = server.cli("tokens", "create", "--operator", "--json")
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout)
    assert new["operator"] is True and new["tenant"] == "operators"
    listed = json.loads(server.cli("tokens", "list", "--tenant", "operators", "--json").stdout)
    assert [t["operator"] for t in listed if t["prefix"] == new["prefix"]] == [True]

    tenant = make_token(tenant_name)
    other = make_token(f"{tenant_name}-other")
    with server.client(tenant) as c:
        r = c.post("/v1/batches", params={"name": "theirs"}, json=[job(1), job(2)])
        assert r.status_code == 201, r.text
        batch_id = r.json()["batch_id"]
        job_id = c.get("/v1/jobs", params={"batch": "theirs"}).json()["jobs"][0]["id"]

    with server.client(new["token"]) as c:
        assert batch_id in [b["id"] for b in c.get("/v1/batches", params={"limit": 1000}).json()["batches"]]
        assert c.get(f"/v1/batches/{batch_id}").json()["jobs"] == 2
        assert c.get(f"/v1/jobs/{job_id}").json()["job"]["id"] == job_id
        assert c.get("/v1/stats", params={"batch_id": batch_id}).json()["jobs"] == 2
    # Another tenant's token: as if the batch did not exist.
    with server.client(other) as c:
        assert c.get(f"/v1/batches/{batch_id}").status_code == 404
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert batch_id not in [b["id"] for b in c.get("/v1/batches").json()["batches"]]


def test_tokens_create_needs_a_tenant_or_operator(server: Server) -> None:
    wrong = server.cli("tokens", "create")
    assert wrong.returncode == 2
    said = " ".join(wrong.stderr.split())
    assert "tokens create needs --tenant NAME (or --operator for an operator's token)" in said
    assert "Traceback" not in said
