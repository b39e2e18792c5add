"""The Claude client over real HTTP to the fake: who retries, how often, and what fails at once."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx2 as httpx
import pytest

from pipeline.claude.client import ClaudeClient, translate
from pipeline.errors import CallFailed, PermanentClaudeError, TransientClaudeError
from pipeline.fake_claude import FakeClaude
from pipeline.flow.prompts import work_prompt
from pipeline.models import JobKind

MODEL = "claude-sonnet-5-5"


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(fake: FakeClaude, sleeps: Sleeps, **kw: object) -> ClaudeClient:
    return ClaudeClient(api_key="test", base_url=fake.base_url, sleep=sleeps, **kw)  # type: ignore[arg-type]


def call(c: ClaudeClient, text: str):  # type: ignore[no-untyped-def]
    p = work_prompt(JobKind.GENERATE, {"prompt": text})
    return c.call(tier="sonnet", model=MODEL, system=p.system, user=p.user, max_tokens=200)



def test_transient_errors_are_retried_and_counted(fake_claude: FakeClaude) -> None:
    sleeps = Sleeps()
    fake_claude.reset()
    result = call(client(fake_claude, sleeps), "retry me [fake:error=529] [fake:times=2]")
    assert [a.status_code for a in result.attempts] == [529, 529, 200]
    assert [a.error_type for a in result.attempts[:2]] == ["overloaded_error"] * 2
    assert len(sleeps) == 2 and all(0 <= s <= 30 for s in sleeps)
    assert fake_claude.stats()["total"] == 3  # the SDK itself retried nothing


def test_retry_after_is_honoured(fake_claude: FakeClaude) -> None:
    sleeps = Sleeps()
    result = call(client(fake_claude, sleeps), "slow down [fake:error=429] [fake:times=1]")
    assert result.attempts[0].status_code == 429
    assert result.attempts[0].retry_after is not None and result.attempts[0].retry_after >= 1
    assert sleeps[0] >= result.attempts[0].retry_after


def test_retries_are_bounded(fake_claude: FakeClaude) -> None:
    sleeps = Sleeps()
    fake_claude.reset()
    with pytest.raises(CallFailed) as info:
        call(client(fake_claude, sleeps, attempts=3), "always failing [fake:error=500]")
    assert info.value.transient and len(info.value.attempts) == 3
    assert fake_claude.stats()["total"] == 3


@pytest.mark.parametrize(("code", "status"), [("400", 400), ("401", 401), ("404", 404), ("413", 413)])
def test_client_errors_fail_at_once_with_the_api_message(fake_claude: FakeClaude, code: str, status: int) -> None:
    sleeps = Sleeps()
    with pytest.raises(CallFailed) as info:
        call(client(fake_claude, sleeps), f"bad [fake:error={code}]")
    assert not info.value.transient and len(info.value.attempts) == 1 and sleeps == []
    assert str(info.value).startswith(f"{status} ") and info.value.request_id


def test_unknown_model_is_a_permanent_error(fake_claude: FakeClaude) -> None:
    c = client(fake_claude, Sleeps())
    with pytest.raises(CallFailed) as info:
        c.call(tier="sonnet", model="claude-nonexistent", system="s", user="u", max_tokens=10)
    assert info.value.status == 404 and "not_found_error" in str(info.value)


def test_dropped_connections_and_stalls_are_transient(fake_claude: FakeClaude) -> None:
    sleeps = Sleeps()
    result = call(client(fake_claude, sleeps), "flaky [fake:error=drop] [fake:times=1]")
    assert result.attempts[0].error_type == "connection_error" and result.attempts[-1].ok
    fast = client(fake_claude, sleeps, timeout_s=0.3, attempts=2)
    with pytest.raises(CallFailed) as info:
        call(fast, "stuck [fake:error=stall] [fake:latency_ms=0]")
    assert info.value.transient and {a.error_type for a in info.value.attempts} == {"timeout"}


# Every status the Messages API documents, the two the SDK singles out (408 request timeout, 409
# lock timeout) and a few a proxy in front of the API may answer: the error.type, and whether a call
# that meets it is tried again. Each answer carries retry-after, except the spend-limit 429.
STATUSES = [
    (400, "invalid_request_error", False),
    (401, "authentication_error", False),
    (402, "billing_error", False),
    (403, "permission_error", False),
    (404, "not_found_error", False),
    (408, "timeout_error", True),
    (409, "conflict_error", True),
    (413, "request_too_large", False),
    (422, "invalid_request_error", False),
    (429, "rate_limit_error", True),
    (429, "spend_limit", False),  # no retry-after: a spend limit, which no wait lifts
    (500, "api_error", True),
    (502, "api_error", True),
    (503, "api_error", True),
    (504, "timeout_error", True),
    (529, "overloaded_error", True),
]


@pytest.mark.parametrize(("status", "error_type", "transient"), STATUSES)
def test_each_status_is_retried_exactly_when_the_sdk_would_retry_it(status: int, error_type: str,
                                                                   transient: bool) -> None:
    """The choice pipeline.claude.client.translate names: switchyard turns the SDK's retries off to own
    them, and retries what the SDK itself would, except a 429 without retry-after. Here the SDK
    (allowed one retry, by its own default policy) meets each status through an in-process
    transport: how many requests it made says whether it retried, and its final error is translated."""
    spend_limit = error_type == "spend_limit"
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        # retry-after-ms (1 ms) keeps the SDK's own retry quick.
        headers = {"request-id": "req_status", **({} if spend_limit else {"retry-after-ms": "1"})}
        body = {"type": "error", "error": {"type": error_type, "message": f"answered {status}"},
                "request_id": "req_status"}
        return httpx.Response(status, json=body, headers=headers)

    sdk = anthropic.Anthropic(api_key="test", base_url="http://claude.invalid", max_retries=1,
                              http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    with pytest.raises(anthropic.APIStatusError) as info:
        sdk.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    err = translate(info.value)
    assert isinstance(err, TransientClaudeError if transient else PermanentClaudeError)
    assert (err.status, err.error_type, err.request_id) == (status, error_type, "req_status")
    assert str(err) == f"{status} {error_type}: answered {status}"
    sdk_retried = len(requests) == 2
    assert sdk_retried == (transient or spend_limit)


def test_a_spend_limit_429_is_not_retried() -> None:
    request = httpx.Request("POST", "http://x/v1/messages")
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "spend limit reached"}}
    without = anthropic.RateLimitError("spend", response=httpx.Response(429, request=request), body=body)
    assert isinstance(translate(without), PermanentClaudeError)
    with_header = anthropic.RateLimitError(
        "slow", response=httpx.Response(429, request=request, headers={"retry-after": "3"}), body=body)
    err = translate(with_header)
    assert isinstance(err, TransientClaudeError) and err.retry_after == 3


def test_many_threads_share_the_connections_in_shards_and_all_calls_fly_at_once(fake_claude: FakeClaude) -> None:
    # 80 threads, each with one slow call (4 s: long enough for the last thread to start under a
    # loaded machine): all 80 must be at the fake together (no thread waits
    # for a connection), while no HTTP pool serves more threads than its shard's connections.
    c = client(fake_claude, Sleeps(), max_connections=80)
    threads = 80
    start = threading.Barrier(threads)
    used: list[object] = []

    def one(i: int) -> str:
        start.wait()
        used.append(c._sdk)
        return call(c, f"ticket {i} [fake:latency_ms=4000]").text

    fake_claude.reset()
    # Earlier tests' stalled requests may still be open at the fake: count on top of them.
    before = fake_claude.stats()["in_flight"]
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(one, range(threads)))
    c.close()
    assert all(answers) and fake_claude.stats()["max_in_flight"] - before == threads
    per_shard = Counter(id(sdk) for sdk in used)
    assert len(per_shard) == 3 and max(per_shard.values()) <= 27, per_shard


@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_an_answer_read_with_orjson_is_the_one_the_sdk_parses(fake_claude: FakeClaude, ttl: str) -> None:
    """ClaudeClient reads the raw body with orjson instead of building the SDK's Message: the same
    text, stop reason and usage, cache writes and reads (and their lifetime) included."""
    fast, sdk = client(fake_claude, Sleeps()), client(fake_claude, Sleeps(), lean=False)

    def ask(c: ClaudeClient, who: str) -> tuple:  # type: ignore[type-arg]
        # Long enough to be cached at Sonnet; the same length whoever asks.
        system = f"Long shared instructions for {who:>6}, kept {ttl}. " + "Be brief and exact. " * 400
        r = c.call(tier="sonnet", model=MODEL, system=system, user="Reply to ticket 7", max_tokens=200,
                   cache_system=True, cache_ttl=ttl)
        return r.text, r.stop_reason, r.attempts[-1].usage, (r.attempts[-1].request_id or "")[:4]

    fast_write, sdk_write = ask(fast, "orjson"), ask(sdk, "sdk")  # each writes its own prefix
    fast_read, sdk_read = ask(fast, "sdk"), ask(sdk, "sdk")  # both read the sdk's: the same answer
    assert fast_read == sdk_read and fast_read[0] and fast_read[3] == "req_"
    # The two writes: different prefixes of one length, so the same counts, whoever read them.
    assert (fast_write[1], fast_write[3]) == (sdk_write[1], sdk_write[3])
    counts = [(u.input_tokens, u.cache_creation_input_tokens, u.cache_creation_1h_input_tokens)
              for u in (fast_write[2], sdk_write[2])]
    assert counts[0] == counts[1]
    written, read = fast_write[2], fast_read[2]
    assert written.cache_creation_input_tokens > 0
    assert read.cache_read_input_tokens == written.cache_creation_input_tokens
    # The hour's share of the writes, where the answer breaks it down (None where it does not).
    assert written.cache_creation_1h_input_tokens in (None, written.cache_creation_input_tokens if ttl == "1h" else 0)
    # A refusal reads the same both ways too.
    refused = [call(c, "no [fake:error=refusal]") for c in (fast, sdk)]
    assert len({(r.text, r.stop_reason, r.attempts[-1].usage) for r in refused}) == 1
    assert refused[0].stop_reason == "refusal"
