"""/v1/tasks over HTTP: apply a TOML or JSON body, list, show a version; each tenant sees its own,
and a bad definition is a 422 of one sentence."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import MakeToken, Server

SAMPLE = (Path(__file__).resolve().parents[2] / "pipeline" / "samples" / "ticket-topic.toml").read_text()
TOML = {"Content-Type": "application/toml"}


def test_apply_list_and_show_per_tenant(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    mine, theirs = server.client(make_token(tenant_name)), server.client(make_token(tenant_name + "-b"))
    first = mine.post("/v1/tasks", content=SAMPLE, headers=TOML)
    assert first.status_code == 201, first.text
    assert first.json() | {"content_sha256": ""} == {"task": "ticket-topic", "version": 1, "created": True,
                                                     "content_sha256": ""}
    again = mine.post("/v1/tasks", content=SAMPLE, headers=TOML)
    assert again.status_code == 200 and again.json()["created"] is False and again.json()["version"] == 1

    # The same task as JSON, one description changed: version 2.
    definition = mine.get("/v1/tasks/ticket-topic").json()["definition"]
    definition["labels"][0]["description"] = "Money, in any form."
    second = mine.post("/v1/tasks", json=definition)
    assert second.status_code == 201 and second.json()["version"] == 2

    listed = mine.get("/v1/tasks").json()["tasks"]
    assert [(t["task"], t["version"], t["kind"]) for t in listed] == [("ticket-topic", 2, "classify")]
    v1 = mine.get("/v1/tasks/ticket-topic", params={"version": 1}).json()
    assert v1["version"] == 1 and v1["definition"]["labels"][0]["description"].startswith("Charges")

    # Another tenant sees none of it.
    assert theirs.get("/v1/tasks").json() == {"tasks": []}
    missing = theirs.get("/v1/tasks/ticket-topic")
    assert missing.status_code == 404 and missing.json()["detail"] == "no task named 'ticket-topic'"
    assert mine.get("/v1/tasks/ticket-topic", params={"version": 5}).json()["detail"] == \
        "task 'ticket-topic' has no version 5"


def test_a_bad_definition_is_422_and_stores_nothing(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    client = server.client(make_token(tenant_name))
    dup = SAMPLE.replace('name = "bug"', 'name = "billing"')
    refused = client.post("/v1/tasks", content=dup, headers=TOML)
    assert refused.status_code == 422
    assert refused.json()["detail"] == "label 2: label 'billing' is defined twice"
    bad_toml = client.post("/v1/tasks", content="name = ", headers=TOML)
    assert bad_toml.status_code == 422 and bad_toml.json()["detail"].startswith("body: not valid TOML")
    yaml = client.post("/v1/tasks", content="name: x", headers={"Content-Type": "application/yaml"})
    assert yaml.status_code == 415
    assert client.get("/v1/tasks").json() == {"tasks": []}


def test_jobs_name_the_tenants_own_task(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    client = server.client(make_token(tenant_name))
    other = server.client(make_token(tenant_name + "-other"))
    assert client.post("/v1/tasks", content=SAMPLE, headers=TOML).status_code == 201
    jobs = [{"key": f"k-{i}", "task": "ticket-topic", "text": f"ticket {i}"} for i in range(3)]
    accepted = client.post("/v1/batches", params={"name": "topics"}, json=jobs)
    assert accepted.status_code == 201, accepted.text
    one = client.post("/v1/jobs", params={"batch": "topics"}, json={"key": "k-9", "task": "ticket-topic", "text": "x"})
    assert one.status_code == 201, one.text
    story = client.get(f"/v1/jobs/{one.json()['id']}").json()
    assert (story["task"], story["task_version"], story["job"]["kind"]) == ("ticket-topic", 1, "classify")

    # Another tenant's task is not there for it, and the request is refused whole.
    refused = other.post("/v1/batches", params={"name": "topics"}, json=jobs)
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("item 0: unknown task: no task named 'ticket-topic'")
