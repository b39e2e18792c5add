"""The Message Batches API, through the real SDK over HTTP: create, retrieve, list, cancel, delete and
results; answers the same as synchronous ones; hints and rates for errored, expired and canceled
requests; envelope validation; and batches kept out of the synchronous limits and counters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlsplit

import anthropic
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.fake_claude.options import parse_batch_error_rates
from tests.fake_claude.helpers import HAIKU, SONNET, error_message, http, message_body, system_for, text_of, user_text

LABELS = ["billing", "shipping"]
DELAY_S = 0.2
# About 1,300 tokens at the fake's four characters a token: a prefix Sonnet caches.
SHARED = "Shared guidance for every request of the batch: name the one label that fits the text. " * 60


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeClaude]:
    with FakeClaude(options=FakeOptions(batch_delay_s=DELAY_S)) as fc:
        yield fc


@pytest.fixture(scope="module")
def client(fake: FakeClaude) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key="test", base_url=fake.base_url, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def slow() -> Iterator[tuple[FakeClaude, anthropic.Anthropic]]:
    """Batches that would take a minute to end: time enough to see them in progress and cancel them."""
    with FakeClaude(options=FakeOptions(batch_delay_s=60)) as fc, anthropic.Anthropic(
        api_key="test", base_url=fc.base_url, max_retries=0
    ) as c:
        yield fc, c


def job(text: str, *, purpose: str = "classify", model: str = SONNET, **extra: Any) -> dict[str, Any]:
    return message_body(user_text(text=text, labels=LABELS), purpose=purpose, model=model, **extra)


def requests_for(texts: list[str], prefix: str = "r") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}{i}", "params": job(t)} for i, t in enumerate(texts)]


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 10.0) -> MessageBatch:
    deadline = time.monotonic() + timeout
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"batch still {batch.processing_status} after {timeout} s"
        time.sleep(0.05)
    return batch


def results(client: anthropic.Anthropic, batch_id: str) -> dict[str, MessageBatchIndividualResponse]:
    out: dict[str, MessageBatchIndividualResponse] = {}
    for line in client.messages.batches.results(batch_id):
        assert line.custom_id not in out, "a custom_id came back twice"
        out[line.custom_id] = line
    return out


def run(client: anthropic.Anthropic, requests: list[dict[str, Any]]) -> dict[str, MessageBatchIndividualResponse]:
    batch = client.messages.batches.create(requests=requests)
    wait_ended(client, batch.id)
    return results(client, batch.id)


def result_types(found: dict[str, MessageBatchIndividualResponse]) -> dict[str, str]:
    return {custom_id: line.result.type for custom_id, line in found.items()}


def error_of(line: MessageBatchIndividualResponse) -> tuple[str, str]:
    assert line.result.type == "errored"
    return line.result.error.error.type, line.result.error.error.message


# -- the endpoints ---------------------------------------------------------------------------------


def test_a_batch_is_in_progress_then_ends_with_results(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    texts = ["billing question", "where is my parcel, shipping", "billing again [fake:difficulty=hard]"]
    created = client.messages.batches.create(requests=requests_for(texts))
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.request_counts.processing == 3 and created.request_counts.succeeded == 0
    assert created.results_url is None and created.ended_at is None
    assert (created.expires_at - created.created_at).total_seconds() == pytest.approx(24 * 3600)
    with pytest.raises(anthropic.AnthropicError, match="finished processing"):
        client.messages.batches.results(created.id)  # the SDK asks retrieve first: no results_url yet

    ended = wait_ended(client, created.id)
    counts = ended.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.expired, counts.canceled) == (0, 3, 0, 0, 0)
    assert ended.ended_at is not None and ended.ended_at >= ended.created_at
    assert ended.results_url and ended.results_url.endswith(f"/v1/messages/batches/{created.id}/results")
    found = results(client, created.id)
    assert set(found) == {"r0", "r1", "r2"}
    labels = {cid: json.loads(text_of(line.result.message))["label"]
              for cid, line in found.items()}
    assert labels == {"r0": "billing", "r1": "shipping", "r2": "billing"}


def test_answers_and_usage_are_the_synchronous_ones(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    params = [job("billing or shipping? parcel late"), job("Summarise this", purpose="draft", model=HAIKU),
              job("triage me [fake:difficulty=medium]", purpose="triage", model=HAIKU)]
    found = run(client, [{"custom_id": f"p{i}", "params": p} for i, p in enumerate(params)])
    for i, body in enumerate(params):
        batched = found[f"p{i}"].result
        assert batched.type == "succeeded"
        direct = client.messages.create(**body)
        assert batched.message.content == direct.content
        assert batched.message.usage == direct.usage
        assert (batched.message.model, batched.message.stop_reason) == (direct.model, direct.stop_reason)
        assert batched.message.id != direct.id


def test_results_come_shuffled_and_are_matched_by_custom_id(client: anthropic.Anthropic) -> None:
    texts = [f"job {i} billing" if i % 2 else f"job {i} shipping" for i in range(40)]
    batch = client.messages.batches.create(requests=requests_for(texts, prefix="s"))
    wait_ended(client, batch.id)
    order = [line.custom_id for line in client.messages.batches.results(batch.id)]
    assert sorted(order) == sorted(f"s{i}" for i in range(40))
    assert order != [f"s{i}" for i in range(40)]
    assert [line.custom_id for line in client.messages.batches.results(batch.id)] == order  # stable per batch
    for line in client.messages.batches.results(batch.id):
        i = int(line.custom_id[1:])
        assert json.loads(text_of(line.result.message))["label"] == ("billing" if i % 2 else "shipping")


def test_raw_results_are_json_lines(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=requests_for(["a", "b"]))
    ended = wait_ended(client, batch.id)
    assert ended.results_url
    url = urlsplit(ended.results_url)
    conn = HTTPConnection(url.netloc, timeout=10)
    try:
        conn.request("GET", url.path, headers={"x-api-key": "t", "anthropic-version": "2023-06-01"})
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200
    lines = body.splitlines()
    assert body.endswith("\n") and len(lines) == 2
    assert {json.loads(line)["custom_id"] for line in lines} == {"r0", "r1"}


def test_list_pages_newest_first(client: anthropic.Anthropic, fake: FakeClaude) -> None:
    ids = [client.messages.batches.create(requests=requests_for([f"list {i}"])).id
           for i in range(3)]
    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2]
    assert page.has_more and page.first_id == ids[2] and page.last_id == ids[1]
    listed = [b.id for b in client.messages.batches.list(limit=2)]  # the SDK follows after_id
    assert listed[:3] == ids[::-1] and len(listed) == len(set(listed))
    status, _, older = http(fake.base_url, f"/v1/messages/batches?limit=1&after_id={ids[2]}")
    assert status == 200 and [b["id"] for b in older["data"]] == [ids[1]] and older["has_more"]
    status, _, newer = http(fake.base_url, f"/v1/messages/batches?limit=5&before_id={ids[1]}")
    assert status == 200 and [b["id"] for b in newer["data"]] == [ids[2]] and not newer["has_more"]
    status, _, bad = http(fake.base_url, "/v1/messages/batches?limit=0")
    assert status == 400 and "limit" in bad["error"]["message"]


def test_cancel_goes_canceling_then_ended_with_every_request_canceled(
    slow: tuple[FakeClaude, anthropic.Anthropic],
) -> None:
    fake, client = slow
    batch = client.messages.batches.create(requests=requests_for(["one", "two", "three"]))
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.canceled == 3 and ended.request_counts.processing == 0
    assert result_types(results(client, batch.id)) == dict.fromkeys(["r0", "r1", "r2"], "canceled")
    assert client.messages.batches.cancel(batch.id).processing_status == "ended"  # nothing left to cancel
    assert fake.stats()["batches"]["results"]["canceled"] >= 3


def test_a_batch_unprocessed_at_24_hours_expires() -> None:
    class Clock:
        now = time.time()

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    with FakeClaude(clock=clock, options=FakeOptions(batch_delay_s=48 * 3600)) as fc, anthropic.Anthropic(
        api_key="t", base_url=fc.base_url, max_retries=0
    ) as client:
        batch = client.messages.batches.create(requests=requests_for(["slow", "slower"]))
        clock.now += 24 * 3600 - 1
        assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
        clock.now += 1
        ended = wait_ended(client, batch.id)
        assert ended.request_counts.expired == 2
        assert result_types(results(client, batch.id)) == {"r0": "expired", "r1": "expired"}


def test_delete_only_once_ended(slow: tuple[FakeClaude, anthropic.Anthropic]) -> None:
    _, client = slow
    batch = client.messages.batches.create(requests=requests_for(["keep me"]))
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.delete(batch.id)
    assert "in_progress" in error_message(caught.value) and "cancel it first" in error_message(caught.value)
    client.messages.batches.cancel(batch.id)
    wait_ended(client, batch.id)
    deleted = client.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in client.messages.batches.list()]


def test_results_of_an_unfinished_batch_is_an_error(slow: tuple[FakeClaude, anthropic.Anthropic]) -> None:
    fake, client = slow
    batch = client.messages.batches.create(requests=requests_for(["later"]))
    status, _, body = http(fake.base_url, f"/v1/messages/batches/{batch.id}/results")
    assert status == 400 and body["type"] == "error"
    assert "in_progress" in body["error"]["message"]
    client.messages.batches.cancel(batch.id)


def test_unknown_batch_and_path(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    for call in (client.messages.batches.retrieve, client.messages.batches.cancel, client.messages.batches.delete):
        with pytest.raises(anthropic.NotFoundError):
            call("msgbatch_nope")
    status, _, body = http(fake.base_url, "/v1/messages/batches/x/y/z")
    assert status == 404 and body["error"]["type"] == "not_found_error"


# -- hints and rates -------------------------------------------------------------------------------


def test_hints_end_requests_errored_expired_or_canceled(client: anthropic.Anthropic) -> None:
    found = run(client, [
        {"custom_id": "ok", "params": job("billing")},
        {"custom_id": "exp", "params": job("billing [fake:batch=expired]")},
        {"custom_id": "err", "params": job("billing [fake:batch=errored]")},
        {"custom_id": "can", "params": job("billing [fake:batch=canceled]")},
        {"custom_id": "529", "params": job("billing [fake:error=529]")},
        {"custom_id": "drop", "params": job("billing [fake:error=drop]")},  # no transport in a batch
        {"custom_id": "opus", "params": job("billing [fake:batch=expired@opus]")},  # a Sonnet call
    ])
    assert result_types(found) == {"ok": "succeeded", "exp": "expired", "err": "errored", "can": "canceled",
                                   "529": "errored", "drop": "succeeded", "opus": "succeeded"}
    assert error_of(found["err"])[0] == "api_error"
    assert error_of(found["529"])[0] == "overloaded_error"


def test_a_times_hint_expires_the_first_submission_only(client: anthropic.Anthropic) -> None:
    request = {"custom_id": "again", "params": job("shipping [fake:batch=expired] [fake:times=1] once")}
    assert result_types(run(client, [request])) == {"again": "expired"}
    assert result_types(run(client, [request])) == {"again": "succeeded"}


def test_rates_are_drawn_from_the_seed() -> None:
    rates = {"errored": 0.2, "expired": 0.2, "canceled": 0.1}
    outcomes = []
    for _ in range(2):
        with FakeClaude(options=FakeOptions(batch_error_rates=rates, seed=7)) as fc, anthropic.Anthropic(
            api_key="t", base_url=fc.base_url, max_retries=0
        ) as client:
            found = run(client, requests_for([f"billing {i}" for i in range(200)]))
            outcomes.append(result_types(found))
            counts = client.messages.batches.list().data[0].request_counts
            assert sum(1 for t in outcomes[-1].values() if t == "errored") == counts.errored
            assert fc.stats()["batches"]["results"] == {
                name: n for name, n in vars(counts).items() if name != "processing" and n}
    assert outcomes[0] == outcomes[1]
    share = {t: sum(1 for v in outcomes[0].values() if v == t) / 200 for t in ("errored", "expired", "canceled")}
    assert 0.1 < share["errored"] < 0.3 and 0.1 < share["expired"] < 0.3 and 0.03 < share["canceled"] < 0.2


def test_parse_batch_error_rates() -> None:
    assert parse_batch_error_rates("errored=0.02, expired=0.01") == {"errored": 0.02, "expired": 0.01}
    for bad, needle in (("failed=0.1", "errored, expired, canceled"), ("errored=lots", "number"),
                        ("errored=1.5", "from 0 to 1"), ("errored=0.6,expired=0.6", "more than 1")):
        with pytest.raises(ValueError, match=needle):
            parse_batch_error_rates(bad)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.fake_claude", "--batch-error-rates", "errored=lots"],
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode == 2
    assert "--batch-error-rates" in result.stderr and "errored=lots" in result.stderr
    assert "Traceback" not in result.stderr


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "needle"),
    [
        ([{"custom_id": "a", "params": job("x")}, {"custom_id": "a", "params": job("y")}],
         "requests.1.custom_id: 'a' is already the custom_id of requests.0"),
        ([{"custom_id": "x" * 65, "params": job("x")}], "requests.0.custom_id: should be 1 to 64 characters"),
        ([{"custom_id": "has space", "params": job("x")}], "requests.0.custom_id"),
        ([{"custom_id": "", "params": job("x")}], "requests.0.custom_id"),
        ([{"params": job("x")}], "requests.0.custom_id"),
        ([{"custom_id": "a", "params": "hello"}], "requests.0.params: Input should be a JSON object"),
        ([{"custom_id": "a", "params": job("x"), "extra": 1}], "requests.0.extra"),
        ([], "at least one request"),
    ],
)
def test_a_bad_envelope_is_a_400_naming_the_request(
    fake: FakeClaude, client: anthropic.Anthropic, requests: list[Any], needle: str
) -> None:
    before = fake.stats()["batches"]["created"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=requests)
    assert needle in error_message(caught.value)
    assert fake.stats()["batches"]["created"] == before


def test_bad_params_end_errored_with_the_synchronous_error(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    no_max_tokens = {k: v for k, v in job("x").items() if k != "max_tokens"}
    unknown_model = job("x", model="claude-nope-9")
    with_temperature = job("x", model=SONNET, temperature=0.5)
    found = run(client, [{"custom_id": "m", "params": no_max_tokens}, {"custom_id": "u", "params": unknown_model},
                         {"custom_id": "t", "params": with_temperature}, {"custom_id": "ok", "params": job("x")}])
    assert found["ok"].result.type == "succeeded"
    for custom_id, params in (("m", no_max_tokens), ("u", unknown_model), ("t", with_temperature)):
        status, _, body = http(fake.base_url, "/v1/messages", params)  # the SDK would not send the first
        assert status in (400, 404)
        assert error_of(found[custom_id]) == (body["error"]["type"], body["error"]["message"])


def test_bodies_over_the_limits_are_413(fake: FakeClaude) -> None:
    # Counted before any request is looked at, so empty params keep the body small.
    many = {"requests": [{"custom_id": f"c{i}", "params": {}} for i in range(100_001)]}
    status, _, body = http(fake.base_url, "/v1/messages/batches", many)
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert "100,000" in body["error"]["message"]
    # A body over 256 MB is refused from its content-length, before it is read.
    host, port = fake.address
    conn = HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/messages/batches")
        for name, value in {"x-api-key": "t", "anthropic-version": "2023-06-01", "content-type": "application/json",
                            "content-length": str(257 * 1024 * 1024)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        error = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 413 and "268,435,456 bytes" in error["error"]["message"]


def test_headers_and_json_are_checked(fake: FakeClaude) -> None:
    status, _, body = http(fake.base_url, "/v1/messages/batches", headers={"anthropic-version": "2023-06-01"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _, body = http(fake.base_url, "/v1/messages/batches", b"{not json", method="POST")
    assert status == 400 and "could not parse JSON" in body["error"]["message"]


# -- apart from the synchronous path ---------------------------------------------------------------


def test_batches_count_apart_from_synchronous_requests(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    before = fake.stats()
    logged = len(fake.requests())
    run(client, requests_for(["billing a", "billing b [fake:batch=expired]", "shipping c"]))
    after = fake.stats()
    assert after["total"] == before["total"] and len(fake.requests()) == logged
    batches, earlier = after["batches"], before["batches"]
    assert batches["created"] == earlier["created"] + 1 and batches["requests"] == earlier["requests"] + 3
    assert batches["results"]["succeeded"] == earlier["results"].get("succeeded", 0) + 2
    assert batches["results"]["expired"] == earlier["results"].get("expired", 0) + 1
    assert batches["output_tokens"] > earlier["output_tokens"]
    # The quality model's answers in the batch are counted with the synchronous ones.
    assert judged_classify(after) == judged_classify(before) + 2
    client.messages.create(**job("one synchronous call"))
    assert fake.stats()["total"] == before["total"] + 1


def judged_classify(stats: dict[str, Any]) -> int:
    by_difficulty = stats["quality"]["answers"].get("classify", {}).get("sonnet", {})
    return sum(counts["right"] + counts["wrong"] for counts in by_difficulty.values())


def test_batches_do_not_use_the_synchronous_rate_limit() -> None:
    with FakeClaude(options=FakeOptions(rpm=2)) as fc, anthropic.Anthropic(
        api_key="t", base_url=fc.base_url, max_retries=0
    ) as client:
        found = run(client, requests_for([f"billing {i}" for i in range(5)]))
        assert set(result_types(found).values()) == {"succeeded"}
        client.messages.create(**job("first"))
        client.messages.create(**job("second"))  # the minute's two requests are still there
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(**job("third"))


def test_cache_fields_in_batch_usage(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    def cached(text: str) -> dict[str, Any]:
        return {"model": SONNET, "max_tokens": 64, "messages": [{"role": "user", "content": user_text(text=text)}],
                "system": [{"type": "text", "text": system_for("classify")},
                           {"type": "text", "text": SHARED + " batch", "cache_control": {"type": "ephemeral"}}]}

    before = fake.stats()["batches"]
    found = run(client, [{"custom_id": f"c{i}", "params": cached(f"billing {i}")} for i in range(3)])
    usages = [found[f"c{i}"].result.message.usage for i in range(3)]
    written = [u.cache_creation_input_tokens for u in usages]
    read = [u.cache_read_input_tokens for u in usages]
    assert sorted(bool(w) for w in written) == [False, False, True]  # the first processed writes the prefix
    assert sorted(bool(r) for r in read) == [False, True, True]  # and the others read it
    after = fake.stats()["batches"]
    assert after["cache_read_input_tokens"] - before["cache_read_input_tokens"] == sum(r or 0 for r in read)
    assert after["cache_creation_input_tokens"] - before["cache_creation_input_tokens"] == sum(
        w or 0 for w in written)
