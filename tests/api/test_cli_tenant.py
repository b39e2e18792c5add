"""A batch the operator enqueues with `switchyard enqueue --tenant T` is T's: T's token sees it and
adds to it over the API, another tenant's does not; one enqueued without --tenant stays the
operator's own, invisible to every token."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import MakeToken, Server, job
from tests.history.helpers import switchyard_json, write_jsonl


def test_a_cli_batch_with_tenant_is_that_tenants_in_the_api(server: Server, make_token: MakeToken, tenant_name: str,
                                                            tmp_path: Path) -> None:
    token, other = make_token(tenant_name), make_token(tenant_name + "-other")
    path = write_jsonl(tmp_path / "jobs.jsonl", [job(i) for i in range(3)])
    name = f"from-cli-{tenant_name}"
    made = switchyard_json(server.database_url, "enqueue", str(path), "--batch", name, "--tenant", tenant_name)
    operators = switchyard_json(server.database_url, "enqueue", str(path), "--batch", name)
    batch_id = made["batch_id"]
    assert (made["tenant"], made["accepted"], operators["tenant"]) == (tenant_name, 3, None)
    assert operators["batch_id"] != batch_id

    with server.client(token) as c:
        assert [(b["id"], b["name"], b["jobs"]) for b in c.get("/v1/batches").json()["batches"]] == \
            [(batch_id, name, 3)]
        assert sorted(j["key"] for j in c.get("/v1/jobs", params={"batch": name}).json()["jobs"]) == \
            ["k-0", "k-1", "k-2"]
        # The same batch over the API: its keys are there already, a new one is added to it.
        again = c.post("/v1/batches", params={"name": name}, json=[job(i) for i in range(4)])
        assert again.status_code == 201, again.text
        assert (again.json()["batch_id"], again.json()["accepted"], again.json()["duplicates"]) == (batch_id, 1, 3)
    with server.client(other) as c:
        assert c.get(f"/v1/batches/{batch_id}").status_code == 404
        assert c.get("/v1/batches").json() == {"batches": []}
        assert c.get(f"/v1/batches/{operators['batch_id']}").status_code == 404
