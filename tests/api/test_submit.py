"""Submitting over HTTP: the CLI's checks and idempotency, one transaction per request, bad input
named, sizes and tenant limits enforced."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from decimal import Decimal
from urllib.parse import quote

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.db import transaction
from pipeline.models import Batch, Job, JobStatus, ModelCall, Stage, Tenant, utcnow
from tests.api.conftest import MAX_BATCH_JOBS, MAX_BODY_BYTES, MakeToken, Server, job
from tests.history.helpers import BAD_BATCH_NAMES


def batch_exists(api_sessions: sessionmaker[Session], tenant: str, name: str) -> bool:
    with api_sessions() as s:
        return s.scalar(select(func.count()).select_from(Batch).join(Tenant, Tenant.id == Batch.tenant_id)
                        .where(Tenant.name == tenant, Batch.name == name)) == 1


def test_one_job_is_idempotent_by_key(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        first = c.post("/v1/jobs", params={"batch": "one"}, json=job(1))
        again = c.post("/v1/jobs", params={"batch": "one"}, json=job(1))
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["created"] is True
        assert again.json()["created"] is False
        assert first.json()["id"] == again.json()["id"]
        story = c.get(f"/v1/jobs/{first.json()['id']}").json()
        assert story["job"]["status"] == "queued"
        assert story["payload"]["labels"] == ["billing", "bug"]


@pytest.mark.parametrize("fmt", ["array", "jsonl"])
def test_batch_body_is_idempotent(server: Server, make_token: MakeToken, tenant_name: str, fmt: str) -> None:
    jobs = [job(i) for i in range(50)]
    if fmt == "array":
        send = {"json": jobs}
    else:
        send = {"content": "".join(json.dumps(j) + "\n" for j in jobs).encode(),
                "headers": {"Content-Type": "application/x-ndjson"}}
    with server.client(make_token(tenant_name)) as c:
        first = c.post("/v1/batches", params={"name": "b"}, **send)  # type: ignore[arg-type]
        assert first.status_code == 201, first.text
        assert first.json() | {"batch_id": 0} == {"batch_id": 0, "batch": "b", "read": 50, "accepted": 50,
                                                   "duplicates": 0}
        again = c.post("/v1/batches", params={"name": "b"}, **send)  # type: ignore[arg-type]
        assert again.json()["accepted"] == 0
        assert again.json()["duplicates"] == 50
        assert c.get(f"/v1/batches/{first.json()['batch_id']}").json()["jobs"] == 50


def test_streamed_jsonl_without_length(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    """A chunked body (no Content-Length), as a client streaming a file sends it."""

    def body() -> Iterator[bytes]:
        for i in range(200):
            yield (json.dumps(job(i)) + "\n").encode()

    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "streamed"}, content=body(),
                   headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    assert r.json()["accepted"] == 200


BAD_ITEMS = [
    ({"kind": "classify", "text": "x"}, "labels"),
    ({"kind": "classify", "text": "x", "labels": "billing"}, "labels"),
    ({"kind": "extract", "text": "x", "schema": {"type": "nope"}}, "schema"),
    ({"kind": "generate"}, "prompt"),
    ({"kind": "generate", "prompt": 42}, "prompt"),
    ({"kind": "generate", "prompt": "x", "colour": "red"}, "colour"),
    ({"kind": "summarise", "text": "x"}, "kind"),
    ({"kind": "generate", "prompt": "x", "tier": "gpt"}, "tier"),
    ({"kind": "generate", "prompt": "x", "key": ""}, "key"),
    ({"kind": "generate", "prompt": "x", "key": "a\u0000b"}, "key"),
    ({"kind": "generate", "prompt": "x", "metadata": [1]}, "metadata"),
    ("just a string", "JSON object"),
]


@pytest.mark.parametrize(("bad", "named"), BAD_ITEMS)
def test_bad_item_in_array_names_index_and_field(server: Server, make_token: MakeToken,
                                                 api_sessions: sessionmaker[Session], tenant_name: str, bad: object,
                                                 named: str) -> None:
    body = [job(0), job(1), bad, job(3)]
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "bad"}, json=body)
        one = c.post("/v1/jobs", params={"batch": "bad-one"}, json=bad)
    assert r.status_code == 422, r.text
    assert r.json()["item"] == 2
    assert r.json()["detail"].startswith("item 2: ")
    assert named in r.json()["detail"]
    assert one.status_code == 422
    assert named in one.json()["detail"]
    # Nothing half-written: not the good items before it, not even the batch.
    assert not batch_exists(api_sessions, tenant_name, "bad")
    assert not batch_exists(api_sessions, tenant_name, "bad-one")


def test_a_schema_reaching_outside_itself_is_refused(server: Server, make_token: MakeToken,
                                                     api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    """Refused at the door, naming the item and the reference or pattern, before any worker sees it."""
    outside = {"kind": "extract", "text": "x", "schema": {"properties": {"a": {"$ref": "file:///etc/passwd"}}}}
    backtracks = {"kind": "extract", "text": "x", "schema": {"type": "string", "pattern": "(?=a)a"}}
    with server.client(make_token(tenant_name)) as c:
        batch = c.post("/v1/batches", params={"name": "schema"}, json=[job(0), outside, job(2)])
        one = c.post("/v1/jobs", params={"batch": "schema-one"}, json=backtracks)
    assert batch.status_code == 422, batch.text
    assert batch.json()["detail"].startswith("item 1: field 'schema' has a reference 'file:///etc/passwd' at "
                                             "properties/a/$ref that does not resolve inside the schema: "
                                             "switchyard follows no reference to a file, a URL or another document")
    assert one.status_code == 422, one.text
    assert one.json()["detail"].startswith("field 'schema' has a pattern '(?=a)a' at pattern that switchyard "
                                           "cannot run")
    assert not batch_exists(api_sessions, tenant_name, "schema")
    assert not batch_exists(api_sessions, tenant_name, "schema-one")


def test_bad_line_in_jsonl_names_line(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                                      tenant_name: str) -> None:
    body = (json.dumps(job(0)) + "\n\n" + json.dumps(job(1)) + "\n" + '{"kind": "classify", "text": "x", "labels": []}'
            + "\n" + json.dumps(job(3)) + "\n")
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "bad-lines"}, content=body.encode(),
                   headers={"Content-Type": "application/x-ndjson"})
        broken = c.post("/v1/batches", params={"name": "bad-lines"}, content=b'{"kind": "generate", "prompt": "x"}\n{',
                        headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 422
    assert r.json()["line"] == 4
    assert "line 4: field 'labels' must be a non-empty list" in r.json()["detail"]
    assert broken.status_code == 422
    assert broken.json()["line"] == 2
    assert "not valid JSON" in broken.json()["detail"]
    assert not batch_exists(api_sessions, tenant_name, "bad-lines")


@pytest.mark.parametrize(("body", "content_type", "status", "says"), [
    (b"{not json", "application/json", 422, "item 0: request body must be a JSON array"),
    (b'[{"kind": "generate", "prompt": "x"}, {not json}]', "application/json", 422, "item 1: not valid JSON"),
    (b'{"kind": "generate", "prompt": "x"}', "application/json", 422, "must be a JSON array"),
    (b'[{"kind": "generate", "prompt": "x"}', "application/json", 422, "not closed"),
    (b'[{"kind": "generate", "prompt": "x"}] trailing', "application/json", 422, "after the closing"),
    (b"\xff\xfe[]", "application/json", 422, "not valid UTF-8"),
    (b"kind,text\n", "text/csv", 415, "text/csv"),
])
def test_malformed_batch_bodies(server: Server, make_token: MakeToken, tenant_name: str, body: bytes,
                                content_type: str, status: int, says: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "m"}, content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_is_refused_by_its_encoding(server: Server, make_token: MakeToken,
                                                      api_sessions: sessionmaker[Session], tenant_name: str,
                                                      encoding: str) -> None:
    """Bodies are read as sent: a compressed one is refused for its Content-Encoding, not for bytes
    that are not UTF-8."""
    body = gzip.compress(json.dumps([job(0)]).encode())
    with server.client(make_token(tenant_name)) as c:
        batch = c.post("/v1/batches", params={"name": "zipped"}, content=body,
                       headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        one = c.post("/v1/jobs", params={"batch": "zipped-one"}, content=gzip.compress(json.dumps(job(0)).encode()),
                     headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        plain = c.post("/v1/jobs", params={"batch": "plain"}, json=job(0), headers={"Content-Encoding": "identity"})
    for r in (batch, one):
        assert r.status_code == 415, r.text
        assert r.json()["detail"] == (f"Content-Encoding {encoding!r} is not supported: send the body "
                                      f"uncompressed")
    assert plain.status_code == 201, plain.text
    assert tenant_batches(api_sessions, tenant_name) == 1


def tenant_batches(api_sessions: sessionmaker[Session], tenant: str) -> int:
    with api_sessions() as s:
        return s.scalar(select(func.count()).select_from(Batch).join(Tenant, Tenant.id == Batch.tenant_id)
                        .where(Tenant.name == tenant)) or 0


@pytest.mark.parametrize(("body", "content_type"), [
    (b"[]", "application/json"), (b" [\n] ", "application/json"), (b"\xef\xbb\xbf[]", "application/json"),
    (b"", "application/x-ndjson"), (b"\n \n", "application/x-ndjson"),
])
def test_a_body_without_jobs_is_refused(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                                        tenant_name: str, body: bytes, content_type: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "nothing"}, content=body, headers={"Content-Type": content_type})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "the request body has no jobs: nothing was enqueued"
    assert tenant_batches(api_sessions, tenant_name) == 0


def test_invalid_utf8_is_named_at_its_item(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                                           tenant_name: str) -> None:
    bad = b'{"key": "k-2", "kind": "generate", "prompt": "caf\xc3"}'
    body = b"[" + b", ".join([json.dumps(job(0)).encode(), json.dumps(job(1)).encode(), bad,
                              json.dumps(job(3)).encode()]) + b"]"
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "utf8"}, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["item"] == 2
    assert r.json()["detail"].startswith("item 2: not valid UTF-8")
    assert tenant_batches(api_sessions, tenant_name) == 0


def test_a_number_too_long_to_read_is_named_at_its_item(server: Server, make_token: MakeToken,
                                                         api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    """Python converts an integer of at most 4,300 digits, and the JSON parser says so with a plain
    ValueError, not a JSON error: a job holding a longer one is refused like any other bad job."""
    good = json.dumps(job(0))
    bad = '{"key": "k-1", "kind": "generate", "prompt": "x", "metadata": {"n": %s}}' % ("9" * 4301)
    said = "a number has more than 4,300 digits, the most switchyard reads"
    with server.client(make_token(tenant_name)) as c:
        one = c.post("/v1/jobs", params={"batch": "long-one"}, content=bad.encode(),
                     headers={"Content-Type": "application/json"})
        array = c.post("/v1/batches", params={"name": "long-array"}, content=f"[{good}, {bad}]".encode(),
                       headers={"Content-Type": "application/json"})
        lines = c.post("/v1/batches", params={"name": "long-lines"}, content=f"{good}\n{bad}\n".encode(),
                       headers={"Content-Type": "application/x-ndjson"})
    assert (one.status_code, one.json()["detail"]) == (422, f"body: {said}")
    assert (array.status_code, array.json()["item"]) == (422, 1), array.text
    assert array.json()["detail"].startswith(f"item 1: {said}")
    assert (lines.status_code, lines.json()["line"]) == (422, 2), lines.text
    assert lines.json()["detail"].startswith(f"line 2: {said}")
    assert tenant_batches(api_sessions, tenant_name) == 0


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_a_byte_order_mark_is_accepted(server: Server, make_token: MakeToken, tenant_name: str,
                                       content_type: str) -> None:
    jobs = [json.dumps(job(i)) for i in range(2)]
    text = "[" + ", ".join(jobs) + "]" if content_type == "application/json" else "\n".join(jobs) + "\n"
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", params={"name": "bom"}, content=b"\xef\xbb\xbf" + text.encode(),
                   headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    assert r.json()["accepted"] == 2


@pytest.mark.parametrize(("name", "says"), BAD_BATCH_NAMES)
def test_a_bad_batch_name_is_refused_as_the_cli_refuses_it(server: Server, make_token: MakeToken,
                                                          api_sessions: sessionmaker[Session], tenant_name: str,
                                                          name: str, says: str) -> None:
    # A byte that is not UTF-8 goes as itself; the server reads it as U+FFFD.
    value = "a%FFb" if name == "a\udcffb" else quote(name, safe="")
    with server.client(make_token(tenant_name)) as c:
        many = c.post(f"/v1/batches?name={value}", json=[job(0)])
        one = c.post(f"/v1/jobs?batch={value}", json=job(0))
    for r, param in ((many, "name"), (one, "batch")):
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"query parameter {param!r}: batch name ")
        assert says in r.json()["detail"]
    assert tenant_batches(api_sessions, tenant_name) == 0


@pytest.mark.parametrize(("path", "params", "named"), [
    ("/v1/jobs", {"limit": "0"}, "query parameter 'limit'"),
    ("/v1/jobs", {"limit": "many"}, "query parameter 'limit'"),
    ("/v1/jobs", {"status": "done"}, "unknown status 'done'"),
    ("/v1/jobs", {"kind": "poem"}, "unknown kind 'poem'"),
    ("/v1/jobs", {"since": "yesterday"}, "since 'yesterday' is not a time"),
    ("/v1/jobs", {"cursor": "zzz"}, "cursor 'zzz'"),
    ("/v1/jobs/x", {}, "path parameter 'job_id'"),
    ("/v1/batches", {"limit": "-1"}, "query parameter 'limit'"),
])
def test_bad_parameters_are_named(server: Server, make_token: MakeToken, tenant_name: str, path: str,
                                  params: dict[str, str], named: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        r = c.get(path, params=params)
    assert r.status_code == 422, r.text
    assert named in r.json()["detail"]


def test_submission_needs_a_batch_name(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        r = c.post("/v1/batches", json=[job(0)])
    assert r.status_code == 422
    assert "query parameter 'name'" in r.json()["detail"]


def test_oversized_bodies_are_413_and_write_nothing(server: Server, make_token: MakeToken,
                                                    api_sessions: sessionmaker[Session], tenant_name: str) -> None:
    big = {"kind": "generate", "prompt": "x" * 4000}
    n = MAX_BODY_BYTES // 4000 + 10

    def streamed() -> Iterator[bytes]:
        for i in range(n):
            yield (json.dumps(big | {"key": f"s{i}"}) + "\n").encode()

    with server.client(make_token(tenant_name)) as c:
        declared = c.post("/v1/batches", params={"name": "big"}, json=[big | {"key": f"d{i}"} for i in range(n)])
        chunked = c.post("/v1/batches", params={"name": "big"}, content=streamed(),
                         headers={"Content-Type": "application/x-ndjson"})
        one = c.post("/v1/jobs", params={"batch": "big"}, json={"kind": "generate", "prompt": "x" * MAX_BODY_BYTES})
        many = c.post("/v1/batches", params={"name": "big"},
                      json=[{"kind": "generate", "prompt": str(i)} for i in range(MAX_BATCH_JOBS + 1)])
    for r in (declared, chunked, one):
        assert r.status_code == 413, r.text
        assert f"{MAX_BODY_BYTES:,}" in r.json()["detail"]
    assert many.status_code == 413
    assert f"more than {MAX_BATCH_JOBS:,} jobs" in many.json()["detail"]
    assert not batch_exists(api_sessions, tenant_name, "big")


def test_jobs_in_flight_limit(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                              tenant_name: str) -> None:
    token = make_token(tenant_name)
    with transaction(api_sessions) as s:
        tenants.set_limits(s, tenant_name, max_jobs_in_flight=5, max_spend_per_day_usd=None)
    with server.client(token) as c:
        assert c.post("/v1/batches", params={"name": "l1"}, json=[job(i) for i in range(4)]).status_code == 201
        over = c.post("/v1/batches", params={"name": "l2"}, json=[job(i) for i in range(2)])
        assert over.status_code == 429
        assert over.json()["detail"] == (f"tenant '{tenant_name}' would have 6 jobs in flight with these 2 new ones, "
                                         "over its limit of 5 (4 already queued or running); retry when some have "
                                         "finished")
        assert over.headers["retry-after"]
        assert not batch_exists(api_sessions, tenant_name, "l2")
        # Duplicates are not new work, and a finished job no longer counts.
        assert c.post("/v1/batches", params={"name": "l1"}, json=[job(i) for i in range(4)]).status_code == 201
        with api_sessions() as s, s.begin():
            s.execute(Job.__table__.update().where(Job.key == "k-0", Job.batch_id.in_(
                select(Batch.id).join(Tenant).where(Tenant.name == tenant_name))).values(status=JobStatus.SUCCEEDED))
        ok = c.post("/v1/jobs", params={"batch": "l1"}, json=job(9))
        assert ok.status_code == 201, ok.text


def test_spend_per_day_limit(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                             tenant_name: str) -> None:
    token = make_token(tenant_name)
    with server.client(token) as c:
        batch_id = c.post("/v1/batches", params={"name": "s"}, json=[job(0)]).json()["batch_id"]
    with transaction(api_sessions) as s:
        tenants.set_limits(s, tenant_name, max_jobs_in_flight=None, max_spend_per_day_usd=Decimal("0.50"))
        job_id = s.scalar(select(Job.id).where(Job.batch_id == batch_id))
        s.add(ModelCall(job_id=job_id, stage=Stage.WORK, tier="opus", model="m", attempt=1, outcome="ok",
                        input_tokens=1, output_tokens=1, cache_creation_input_tokens=0, cache_read_input_tokens=0,
                        cost_usd=Decimal("0.75"), started_at=utcnow()))
    with server.client(token) as c:
        r = c.post("/v1/jobs", params={"batch": "s"}, json=job(1))
        assert r.status_code == 429
        detail = r.json()["detail"]
        assert f"tenant '{tenant_name}' has spent $0.7500 today (UTC)" in detail
        assert "daily spend limit of $0.5000" in detail
        assert int(r.headers["retry-after"]) > 0
        assert c.get("/v1/queue").json()["tenant"]["spend_today_usd"] == "0.75000000"


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_jobs_in_flight": 0, "max_spend_per_day_usd": None}, "its limit of jobs in flight is 0"),
    ({"max_jobs_in_flight": None, "max_spend_per_day_usd": Decimal(0)}, "its daily spend limit is $0"),
])
def test_a_limit_of_zero_accepts_no_new_jobs_and_says_so(server: Server, make_token: MakeToken,
                                                         api_sessions: sessionmaker[Session], tenant_name: str,
                                                         limits: dict[str, object], message: str) -> None:
    """What `tenants limits` prints for 0 ("it accepts no new jobs") is what is enforced, and the
    refusal does not promise a later acceptance."""
    token = make_token(tenant_name)
    with transaction(api_sessions) as s:
        tenants.set_limits(s, tenant_name, **limits)  # type: ignore[arg-type]
    with server.client(token) as c:
        r = c.post("/v1/jobs", params={"batch": "z"}, json=job(0))
    assert r.status_code == 429
    assert r.json()["detail"] == f"tenant '{tenant_name}' accepts no new jobs: {message}"
    assert "retry-after" not in r.headers
    assert not batch_exists(api_sessions, tenant_name, "z")


def test_cancelled_batch_takes_no_new_jobs(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        batch_id = c.post("/v1/batches", params={"name": "c"}, json=[job(0), job(1)]).json()["batch_id"]
        assert c.post(f"/v1/batches/{batch_id}/cancel").json()["cancelled"] == 2
        again = c.post(f"/v1/batches/{batch_id}/cancel")
        assert again.status_code == 200
        assert again.json()["cancelled"] == 0
        for body in ([job(2)], [job(0)]):  # new jobs, or ones it already has: a cancelled batch stays closed
            r = c.post("/v1/batches", params={"name": "c"}, json=body)
            assert r.status_code == 409
            assert "batch 'c' was cancelled" in r.json()["detail"]
        assert c.post("/v1/jobs", params={"batch": "c"}, json=job(3)).status_code == 409
        summary = c.get(f"/v1/batches/{batch_id}").json()
        assert summary["by_status"] == {"cancelled": 2}
        assert summary["finished"] is True


def test_job_list_paging_and_filters(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        c.post("/v1/batches", params={"name": "p"}, json=[job(i) for i in range(7)])
        c.post("/v1/batches", params={"name": "q"}, json=[{"key": "x-1", "kind": "generate", "prompt": "hi"}])
        seen: list[str] = []
        cursor = None
        while True:
            page = c.get("/v1/jobs", params={"batch": "p", "limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["key"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"k-{i}" for i in reversed(range(7))]
        assert [j["key"] for j in c.get("/v1/jobs", params={"kind": "generate"}).json()["jobs"]] == ["x-1"]
        assert len(c.get("/v1/jobs", params={"key_prefix": "k-", "status": ["queued", "failed"]}).json()["jobs"]) == 7
        assert c.get("/v1/jobs", params={"since": "1h"}).json()["jobs"]
        assert c.get("/v1/jobs", params={"until": "2000-01-01"}).json()["jobs"] == []


def test_metrics_count_requests_and_show_the_queues(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        assert c.post("/v1/batches", params={"name": "m"}, json=[job(0)]).status_code == 201
        assert c.get("/v1/jobs/0").status_code == 404
        assert c.post("/v1/batches", params={"name": "m"}, json=[{"kind": "x"}]).status_code == 422
        text = c.get("/metrics").text
    assert 'switchyard_api_requests_total{method="POST",route="/v1/batches",status="2xx"}' in text
    # By route template, never by raw path: ids do not become labels (tests/api/test_metrics_bounded.py).
    assert 'route="/v1/jobs/{job_id}",status="4xx"' in text
    assert 'switchyard_queue_depth{queue="triage"}' in text
    assert 'switchyard_jobs{status="queued"}' in text
    assert 'switchyard_api_submissions_refused_total{reason="invalid"}' in text
    assert "switchyard_api_jobs_accepted_total" in text
    assert tenant_name not in text
