"""The tiers' shared budget, against the real Redis. Bucket arithmetic is checked at fixed
timestamps (the script takes ``now`` from the caller when given one), so no test depends on how
fast this machine is."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from pipeline.claude.client import ClaudeClient
from pipeline.claude.pricing import Usage
from pipeline.claude.ratelimit import RedisRateLimiter, TierLimits, parse_overrides
from pipeline.errors import ConfigError, RateLimited

T0 = 1_800_000_000_000.0  # a fixed "now", in ms


@pytest.fixture
def client(broker_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(broker_url)
    yield c
    c.close()


@pytest.fixture
def tier() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def limiter(client: redis.Redis, tier: str, **limits: int) -> RedisRateLimiter:
    return RedisRateLimiter(client, {tier: TierLimits(**limits)}, window_s=60, max_wait_s=10)


def test_requests_bucket_allows_its_burst_then_spaces_reservations(client: redis.Redis, tier: str) -> None:
    rl = limiter(client, tier, rpm=5)
    for _ in range(5):
        r = rl.reserve(tier, input_tokens=10, output_tokens=10, now_ms=T0)
        assert r.granted
        assert r.wait_s == 0
    # The sixth must wait one refill interval (60 s / 5): refused under a 10 s bound, taking nothing...
    refused = rl.reserve(tier, input_tokens=10, output_tokens=10, now_ms=T0)
    assert not refused.granted
    assert refused.wait_s == pytest.approx(12.0)
    assert rl.reserve(tier, input_tokens=10, output_tokens=10, now_ms=T0).wait_s == pytest.approx(12.0)
    # ...granted under a longer bound, and the next reservation queues behind it.
    assert rl.reserve(tier, input_tokens=1, output_tokens=1, max_wait_s=30, now_ms=T0).wait_s == pytest.approx(12.0)
    assert rl.reserve(tier, input_tokens=1, output_tokens=1, max_wait_s=30, now_ms=T0).wait_s == pytest.approx(24.0)
    # Time refills it: 36 s later the debt of two is paid and one more token has come in.
    later = rl.reserve(tier, input_tokens=1, output_tokens=1, max_wait_s=0, now_ms=T0 + 36_000)
    assert later.granted
    assert later.wait_s == 0


def test_input_and_output_tokens_are_counted_and_output_is_refunded(client: redis.Redis, tier: str) -> None:
    rl = limiter(client, tier, itpm=1000, otpm=1000)
    assert rl.reserve(tier, input_tokens=600, output_tokens=1000, now_ms=T0).granted
    # 1000 output tokens reserved (max_tokens): nothing left for another call for a minute.
    r = rl.reserve(tier, input_tokens=100, output_tokens=1000, now_ms=T0)
    assert not r.granted
    assert r.wait_s == pytest.approx(60.0)
    # The call used only 100: 900 come back, and the estimate of 600 input tokens was 100 short.
    rl.adjust(tier, input_tokens=100, output_tokens=-900, now_ms=T0)
    r = rl.reserve(tier, input_tokens=300, output_tokens=900, now_ms=T0)
    assert r.granted
    assert r.wait_s == 0
    # Input left: 1000 - 600 - 100 - 300 = 0, so 300 more must wait 300/1000 of a minute.
    r = rl.reserve(tier, input_tokens=300, output_tokens=0, max_wait_s=60, now_ms=T0)
    assert r.wait_s == pytest.approx(18.0)


def test_a_refund_never_fills_a_bucket_past_its_size(client: redis.Redis, tier: str) -> None:
    rl = limiter(client, tier, otpm=1000)
    rl.adjust(tier, output_tokens=-5000, now_ms=T0)
    assert rl.reserve(tier, input_tokens=0, output_tokens=1000, now_ms=T0).granted
    assert not rl.reserve(tier, input_tokens=0, output_tokens=1, max_wait_s=0, now_ms=T0).granted


def test_a_request_larger_than_the_bucket_waits_for_a_full_bucket_not_forever(client: redis.Redis, tier: str) -> None:
    rl = limiter(client, tier, itpm=1000)
    assert rl.reserve(tier, input_tokens=5000, output_tokens=0, now_ms=T0).granted
    r = rl.reserve(tier, input_tokens=5000, output_tokens=0, max_wait_s=120, now_ms=T0)
    assert r.wait_s == pytest.approx(60.0)


def test_unlimited_tier_never_waits(client: redis.Redis, tier: str) -> None:
    rl = limiter(client, tier)
    for _ in range(100):
        assert rl.reserve(tier, input_tokens=10**6, output_tokens=10**6, max_wait_s=0, now_ms=T0).wait_s == 0


def test_penalize_pauses_every_limiter_of_the_tier_and_drains_its_requests(client: redis.Redis, tier: str,
                                                                            broker_url: str) -> None:
    one, other = limiter(client, tier, rpm=600), limiter(redis.Redis.from_url(broker_url), tier, rpm=600)
    assert one.reserve(tier, input_tokens=1, output_tokens=1).granted  # the bucket exists
    one.penalize(tier, retry_after=30)
    # Any limiter on the same Redis, as in another worker process, sees the pause...
    assert 0 < other.paused_for(tier) <= 30
    r = other.reserve(tier, input_tokens=1, output_tokens=1)
    assert not r.granted
    # The pause, plus one refill interval (60 s / 600) for the token the drained bucket lacks.
    assert 29 < r.wait_s <= 30 + 0.1
    # ...a shorter retry-after never shortens it...
    other.penalize(tier, retry_after=1)
    assert other.paused_for(tier) > 1
    # ...and the request bucket is empty until the pause ends, so the tier resumes at its steady
    # rate instead of in a burst.
    fields = {k.decode(): float(v) for k, v in client.hgetall(RedisRateLimiter.keys(tier)[0]).items()}
    assert fields["rl"] <= 0
    pause_end_ms = float(client.get(RedisRateLimiter.keys(tier)[1]))
    assert fields["rt"] == pytest.approx(pause_end_ms, abs=1)


def test_acquire_sleeps_its_turn_or_refuses_without_taking(client: redis.Redis, tier: str) -> None:
    slept: list[float] = []
    rl = RedisRateLimiter(client, {tier: TierLimits(rpm=60)}, window_s=60, max_wait_s=3, sleep=slept.append)
    for _ in range(60):
        rl.acquire(tier, input_tokens=1, output_tokens=1)
    # The bucket is empty: the next turn is about a second off, within the bound: slept, not refused.
    rl.acquire(tier, input_tokens=1, output_tokens=1)
    assert len(slept) == 1
    assert 0 < slept[0] <= 1.0
    # Two more turns are a second apart each; the fourth beyond the burst is past the 3 s bound.
    rl.acquire(tier, input_tokens=1, output_tokens=1)
    rl.acquire(tier, input_tokens=1, output_tokens=1)
    before = client.hgetall(RedisRateLimiter.keys(tier)[0])
    with pytest.raises(RateLimited) as info:
        rl.acquire(tier, input_tokens=1, output_tokens=1)
    assert info.value.tier == tier
    assert info.value.wait_s > 3
    assert client.hgetall(RedisRateLimiter.keys(tier)[0]) == before  # nothing was taken


def test_acquire_waits_out_a_pause_that_began_after_its_reservation(client: redis.Redis, tier: str) -> None:
    slept: list[float] = []
    rl = RedisRateLimiter(client, {tier: TierLimits()}, window_s=60, max_wait_s=10, sleep=slept.append)
    calls = 0

    def sleep_then_lift(seconds: float) -> None:
        nonlocal calls
        calls += 1
        slept.append(seconds)
        client.delete(RedisRateLimiter.keys(tier)[1])  # the pause ends while we sleep

    rl._sleep = sleep_then_lift
    rl.penalize(tier, retry_after=5)
    rl.acquire(tier, input_tokens=1, output_tokens=1)
    assert calls == 1
    assert 4 < slept[0] <= 5.1
    # A pause longer than the bound hands the job back instead.
    rl.penalize(tier, retry_after=60)
    with pytest.raises(RateLimited):
        rl.acquire(tier, input_tokens=1, output_tokens=1)


def test_concurrent_reservations_from_many_threads_and_clients_never_overdraw(broker_url: str, tier: str) -> None:
    clients = [redis.Redis.from_url(broker_url) for _ in range(4)]
    limiters = [limiter(c, tier, rpm=25, itpm=10_000) for c in clients]
    granted: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(40)

    def worker(i: int) -> None:
        start.wait()
        for _ in range(5):
            ok = limiters[i % 4].reserve(tier, input_tokens=100, output_tokens=0, max_wait_s=0, now_ms=T0).granted
            with lock:
                granted.append(ok)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 200
    assert sum(granted) == 25  # exactly the burst: every reservation was atomic
    for c in clients:
        c.close()


def test_overrides_from_the_environment() -> None:
    base = {"sonnet": TierLimits(rpm=100), "opus": TierLimits()}
    out = parse_overrides("sonnet.itpm=5000, opus.rpm=20", base)
    assert out["sonnet"] == TierLimits(rpm=100, itpm=5000)
    assert out["opus"] == TierLimits(rpm=20)
    for bad in ("sonnet.rpm", "gpt.rpm=5", "sonnet.tpm=5", "sonnet.rpm=-1"):
        with pytest.raises(ConfigError, match="SWITCHYARD_RATE_LIMITS"):
            parse_overrides(bad, base)


@contextmanager
def answering(usage: dict[str, Any]) -> Iterator[str]:
    """A Messages endpoint on a free local port whose every answer reports ``usage``: the call's
    usage as the real API reports it with prompt caching (the fake Claude does not cache)."""

    class Answer(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                               "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                               "stop_sequence": None, "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("request-id", "req_1")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_cache_reads_take_nothing_from_the_input_budget_but_writes_do(client: redis.Redis, tier: str) -> None:
    # The API counts input tokens and cache writes against the input-tokens-per-minute limit, and
    # not cache reads. A day's window, so that the bucket does not visibly refill during the call.
    day = 24 * 3600
    rl = RedisRateLimiter(client, {tier: TierLimits(itpm=1_000_000)}, window_s=day, max_wait_s=10)
    usage = {"input_tokens": 300, "output_tokens": 10, "cache_creation_input_tokens": 2000,
             "cache_read_input_tokens": 50_000,
             "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 1500}}
    with answering(usage) as url:
        c = ClaudeClient(api_key="test", base_url=url, limiter=rl, attempts=1)
        try:
            result = c.call(tier=tier, model="m", system="s" * 4000, user="u" * 400, max_tokens=100)
        finally:
            c.close()
    # What was recorded: every field, the 1-hour part of the writes too (it costs more).
    assert result.attempts[-1].usage == Usage(300, 10, cache_creation_input_tokens=2000,
                                              cache_read_input_tokens=50_000, cache_creation_1h_input_tokens=1500)
    # The estimate of 1,100 taken before the call is settled to 300 + 2,000 afterwards.
    left = rl.levels(tier)["input_tokens_left"]
    assert left == pytest.approx(1_000_000 - 2300, abs=5)
