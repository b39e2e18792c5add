"""Server behaviour: concurrency, introspection, rate limits, random faults, determinism, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import pytest

from pipeline.fake_claude import FakeClaude, FakeOptions, parse_faults
from tests.fake_claude.helpers import (
    HAIKU,
    OPUS,
    SONNET,
    ask,
    error_message,
    http,
    message_body,
    text_of,
    user_text,
)

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["billing", "shipping"]


def test_concurrent_slow_requests_are_all_in_flight() -> None:
    # Each request sleeps 3 s: long enough for all 20 threads to start on a loaded machine.
    with FakeClaude(options=FakeOptions(latency_ms=3000)) as fc:
        client = anthropic.Anthropic(api_key="t", base_url=fc.base_url, max_retries=0)
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                ask(client, "classify", user_text(text=f"billing {i}", labels=LABELS))
            except anthropic.APIError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 2.5  # poll: thread start-up is slower on a loaded machine
        while fc.stats()["in_flight"] < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fc.stats()["in_flight"] == 20
        for t in threads:
            t.join()
        client.close()
        stats = fc.stats()
        assert not errors
        assert stats["max_in_flight"] == 20
        assert stats["in_flight"] == 0
        assert stats["total"] == 20  # and max_in_flight says they slept side by side, not one after another


def test_stats_and_request_log(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    fake.reset()
    ask(client, "classify", user_text(text="billing", labels=LABELS), model=SONNET)
    ask(client, "triage", user_text(text="x"), model=HAIKU)
    with pytest.raises(anthropic.OverloadedError):
        ask(client, "draft", user_text(instructions="x [fake:error=529]"), model=OPUS)
    status, _, stats = http(fake.base_url, "/_fake/stats")
    assert status == 200
    assert stats["total"] == 3
    assert stats["by_model"] == {SONNET: 1, HAIKU: 1, OPUS: 1}
    assert stats["by_purpose"] == {"classify": 1, "triage": 1, "draft": 1}
    assert stats["by_status"] == {"200": 2, "529": 1}
    assert stats["by_fault"] == {"529": 1}
    assert stats == fake.stats()

    log = http(fake.base_url, "/_fake/requests")[2]
    assert log == fake.requests()
    assert [e["status"] for e in log] == [200, 200, 529]
    first = log[0]
    assert set(first) >= {"model", "purpose", "status", "started_at", "ended_at", "input_tokens",
                          "output_tokens", "request_id"}
    assert first["started_at"] <= first["ended_at"]
    assert first["input_tokens"] > 0 and first["output_tokens"] > 0
    assert log[2]["output_tokens"] == 0

    assert http(fake.base_url, "/_fake/reset", {})[0] == 200
    assert fake.stats()["total"] == 0
    assert fake.requests() == []


def test_rpm_limit_answers_429_with_retry_after() -> None:
    with FakeClaude(options=FakeOptions(rpm=2)) as fc:
        client = anthropic.Anthropic(api_key="t", base_url=fc.base_url, max_retries=0)
        ask(client, "classify", "a", model=SONNET)
        ask(client, "classify", "b", model=SONNET)
        with pytest.raises(anthropic.RateLimitError) as caught:
            ask(client, "classify", "c", model=SONNET)
        headers = caught.value.response.headers
        assert 25 <= int(headers["retry-after"]) <= 30  # one request refills in 60 s / 2
        assert int(headers["retry-after-ms"]) > 25_000
        assert "rate limit" in error_message(caught.value)
        # Buckets are per model class.
        assert ask(client, "classify", "d", model=OPUS).content
        ok = http(fc.base_url, "/v1/messages", message_body("e", model=OPUS))[1]
        assert ok["anthropic-ratelimit-requests-limit"] == "2"
        assert ok["anthropic-ratelimit-requests-remaining"] == "0"
        client.close()


def test_input_token_limit() -> None:
    with FakeClaude(options=FakeOptions(itpm=100)) as fc:
        client = anthropic.Anthropic(api_key="t", base_url=fc.base_url, max_retries=0)
        ask(client, "other", "x" * 300, model=HAIKU)  # ~ 80 tokens with the system prompt
        with pytest.raises(anthropic.RateLimitError):
            ask(client, "other", "x" * 300, model=HAIKU)
        client.close()


def _faults_drawn(seed: int, n: int = 40) -> list[str | None]:
    """The fault each of ``n`` requests in a row got, in order (None: answered)."""
    options = FakeOptions(fault_rate=0.3, faults=("429", "529", "500", "empty"), seed=seed)
    with FakeClaude(options=options) as fc:
        for i in range(n):
            http(fc.base_url, "/v1/messages", message_body(f"job {i}"))
        return [r["fault"] for r in fc.requests()]


def test_random_faults_are_reproducible_by_seed() -> None:
    first, second, other = _faults_drawn(7), _faults_drawn(7), _faults_drawn(8)
    assert len(first) == 40
    assert first == second  # the same seed: the same requests fail, each the same way
    assert 0 < sum(f is not None for f in first) < 40
    assert other != first  # another seed draws afresh (for seeds 7 and 8, a different sequence)


def test_answers_are_deterministic(fake: FakeClaude, client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    for purpose, user in [
        ("triage", user_text(text="Some job")),
        ("classify", user_text(text="nothing matches", labels=["x", "y", "z"])),
        ("extract", user_text(text="Some text", schema=schema)),
        ("draft", user_text(instructions="Write it")),
    ]:
        answers = {text_of(ask(client, purpose, user)) for _ in range(3)}
        assert len(answers) == 1, purpose


def test_fault_rate_one_uses_only_listed_faults() -> None:
    with FakeClaude(options=FakeOptions(fault_rate=1.0, faults=("refusal",))) as fc:
        client = anthropic.Anthropic(api_key="t", base_url=fc.base_url, max_retries=0)
        assert ask(client, "classify", "x").stop_reason == "refusal"
        client.close()


def test_parse_faults() -> None:
    assert parse_faults("429, 529,drop") == ("429", "529", "drop")
    with pytest.raises(ValueError, match="boom"):
        parse_faults("429,boom")
    with pytest.raises(ValueError):
        FakeOptions(fault_rate=2.0)
    with pytest.raises(ValueError, match="nope"):
        FakeOptions(faults=("nope",))


def test_stop_wakes_sleeping_requests() -> None:
    fc = FakeClaude(options=FakeOptions(latency_ms=10_000)).start()
    client = anthropic.Anthropic(api_key="t", base_url=fc.base_url, max_retries=0, timeout=5)
    caught: list[BaseException] = []

    def call() -> None:
        try:
            ask(client, "classify", "x")
        except anthropic.APIConnectionError as exc:
            caught.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    fc.stop()
    thread.join(timeout=3)
    assert time.monotonic() - started < 2
    assert caught  # dropped, not answered after a 10 s sleep
    client.close()


def test_cli_serves_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.fake_claude", "--port", "0", "--latency-ms", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("fake-claude listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1]
        status, _, message = http(base_url, "/v1/messages", message_body("hi"))
        assert status == 200 and message["type"] == "message"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_unknown_faults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.fake_claude", "--faults", "429,kaboom"],
        cwd=ROOT, capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode == 2
    assert "kaboom" in result.stderr


def test_stats_json_is_serialisable(fake: FakeClaude) -> None:
    assert json.loads(json.dumps(fake.stats())) == fake.stats()
