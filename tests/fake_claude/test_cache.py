"""Prompt caching: prefixes written at cache_control breakpoints, read by later requests, with TTLs,
per-model minimums, misses while the first answer is still on its way, and usage that adds up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import Message

from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.fake_claude.options import parse_cache_min_tokens
from tests.fake_claude.helpers import HAIKU, SONNET, error_message, system_for, user_text

# About 1,500 tokens at the fake's four characters a token: above Sonnet's 1,024, below Haiku's 4,096.
SHARED = "Label definitions. billing: charges, refunds and invoices. shipping: parcels and couriers. " * 66


class Clock:
    """The fake's clock, moved by hand so a TTL expires without waiting for it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cached(clock: Clock) -> Iterator[tuple[FakeClaude, anthropic.Anthropic]]:
    with FakeClaude(clock=clock) as fc, anthropic.Anthropic(
        api_key="t", base_url=fc.base_url, max_retries=0
    ) as client:
        yield fc, client


def _ask(
    client: anthropic.Anthropic,
    job: str,
    *,
    shared: str = SHARED,
    model: str = SONNET,
    ttl: str | None = None,
    **extra: Any,
) -> Message:
    control: dict[str, Any] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return client.messages.create(
        model=model,
        max_tokens=256,
        system=[
            {"type": "text", "text": system_for("classify")},
            {"type": "text", "text": shared, "cache_control": control},  # type: ignore[typeddict-item]
        ],
        messages=[{"role": "user", "content": user_text(text=job, labels=["billing", "shipping"])}],
        **extra,
    )


def _usage(message: Message) -> tuple[int, int, int]:
    u = message.usage
    return u.input_tokens, u.cache_creation_input_tokens or 0, u.cache_read_input_tokens or 0


def test_a_repeated_prefix_is_read_after_the_first_answer(
    cached: tuple[FakeClaude, anthropic.Anthropic],
) -> None:
    fake, client = cached
    first = _usage(_ask(client, "I was charged twice"))
    second = _usage(_ask(client, "Where is my parcel?"))
    assert first[1] > 1024 and first[2] == 0       # written, nothing read
    assert second[1] == 0 and second[2] == first[1]  # the same prefix, read whole
    assert second[0] < 50                            # only the job itself is uncached input
    cache = fake.stats()["cache"][SONNET]
    assert cache == {"hits": 1, "misses": 1, "writes": 1, "uncacheable": 0,
                     "read_input_tokens": first[1], "creation_input_tokens": first[1]}
    assert [e["cache_read_input_tokens"] for e in fake.requests()] == [0, first[1]]


def test_usage_adds_up_to_the_whole_prompt(cached: tuple[FakeClaude, anthropic.Anthropic]) -> None:
    _, client = cached
    job = "Please refund the duplicate charge on invoice 7"
    system: Any = [{"type": "text", "text": system_for("classify")}, {"type": "text", "text": SHARED}]
    messages: Any = [{"role": "user", "content": user_text(text=job, labels=["billing", "shipping"])}]
    whole = client.messages.count_tokens(model=SONNET, system=system, messages=messages).input_tokens
    for message in (_ask(client, job), _ask(client, job)):
        assert sum(_usage(message)) == whole


def test_two_breakpoints_read_the_first_and_write_the_second(
    cached: tuple[FakeClaude, anthropic.Anthropic],
) -> None:
    _, client = cached
    examples = "Example: 'my card was charged twice' is billing. " * 40  # ~500 tokens more

    def call(job: str, more: str) -> tuple[int, int, int]:
        return _usage(client.messages.create(
            model=SONNET, max_tokens=256,
            system=[{"type": "text", "text": system_for("classify")},
                    {"type": "text", "text": SHARED, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": [
                {"type": "text", "text": more, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": user_text(text=job)},
            ]}],
        ))

    first = call("a", examples)
    second = call("b", examples + " And one more example.")
    assert first[2] == 0 and first[1] > 1500
    assert second[2] > 1024                      # the system prefix, read
    assert 0 < second[1] < first[1] - second[2] + 20  # only the changed examples, written
    assert second[2] + second[1] > first[1]


def test_requests_fired_before_the_first_answer_all_miss(
    cached: tuple[FakeClaude, anthropic.Anthropic],
) -> None:
    fake, client = cached
    results: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []
    together = threading.Barrier(4)

    def call(i: int) -> None:
        together.wait()  # all four sent well within the first answer's 800 ms
        try:
            results.append(_usage(_ask(client, f"job {i} [fake:latency_ms=800]")))
        except anthropic.APIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4
    assert all(read == 0 and written > 1024 for _, written, read in results)
    after = _usage(_ask(client, "job 5"))
    assert after[1] == 0 and after[2] == results[0][1]
    cache = fake.stats()["cache"][SONNET]
    assert (cache["hits"], cache["misses"], cache["writes"]) == (1, 4, 4)


def test_a_slow_writer_leaves_a_quick_follower_missing() -> None:
    """An entry is readable once the answer that wrote it has gone out, not when it was decided."""
    with FakeClaude() as fake, anthropic.Anthropic(api_key="t", base_url=fake.base_url, max_retries=0) as client:
        slow = threading.Thread(target=_ask, args=(client, "slow [fake:latency_ms=1000]"))
        slow.start()
        deadline = time.monotonic() + 2
        while fake.stats()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        quick = _usage(_ask(client, "quick"))
        slow.join()
        assert quick[2] == 0 and quick[1] > 0


def test_the_5_minute_ttl_expires_and_is_refreshed_by_a_read(
    cached: tuple[FakeClaude, anthropic.Anthropic], clock: Clock,
) -> None:
    _, client = cached
    written = _usage(_ask(client, "a"))[1]
    clock.now += 290
    assert _usage(_ask(client, "b"))[2] == written  # read, and the read restarts the 5 minutes
    clock.now += 290
    assert _usage(_ask(client, "c"))[2] == written
    clock.now += 301
    expired = _usage(_ask(client, "d"))
    assert expired[2] == 0 and expired[1] == written


def test_the_1_hour_ttl(cached: tuple[FakeClaude, anthropic.Anthropic], clock: Clock) -> None:
    _, client = cached
    written = _usage(_ask(client, "a", ttl="1h"))[1]
    clock.now += 50 * 60
    assert _usage(_ask(client, "b", ttl="1h"))[2] == written
    clock.now += 61 * 60
    assert _usage(_ask(client, "c", ttl="1h"))[2] == 0


def test_a_prefix_below_the_model_minimum_is_not_cached(
    cached: tuple[FakeClaude, anthropic.Anthropic],
) -> None:
    fake, client = cached
    short = SHARED[:2000]  # ~500 tokens: below Sonnet's 1,024
    for job in ("a", "b"):
        assert _usage(_ask(client, job, shared=short))[1:] == (0, 0)
    # ~1,500 tokens is enough for Sonnet, not for Haiku's 4,096.
    for job in ("a", "b"):
        assert _usage(_ask(client, job, model=HAIKU))[1:] == (0, 0)
    assert fake.stats()["cache"][SONNET]["uncacheable"] == 2
    assert fake.stats()["cache"][HAIKU] == {"hits": 0, "misses": 0, "writes": 0, "uncacheable": 2,
                                             "read_input_tokens": 0, "creation_input_tokens": 0}


def test_the_minimum_is_configurable_per_model() -> None:
    options = FakeOptions(cache_min_tokens={"haiku": 1024})
    with FakeClaude(options=options) as fake, anthropic.Anthropic(
        api_key="t", base_url=fake.base_url, max_retries=0
    ) as client:
        _ask(client, "a", model=HAIKU)
        assert _usage(_ask(client, "b", model=HAIKU))[2] > 1024


def test_the_cache_is_per_model_and_per_output_format(
    cached: tuple[FakeClaude, anthropic.Anthropic],
) -> None:
    _, client = cached
    _ask(client, "a")
    assert _usage(_ask(client, "b", model="claude-sonnet-4-6"))[2] == 0
    schema = {"type": "object", "properties": {"label": {"enum": ["billing", "shipping"]}},
              "required": ["label"]}
    fmt: Any = {"format": {"type": "json_schema", "schema": schema}}
    assert _usage(_ask(client, "c", output_config=fmt))[2] == 0
    assert _usage(_ask(client, "d", output_config=fmt))[2] > 0


def test_more_than_four_breakpoints_is_a_400(cached: tuple[FakeClaude, anthropic.Anthropic]) -> None:
    _, client = cached
    blocks: Any = [{"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
                   for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=SONNET, max_tokens=16, system=blocks[:2],
                               messages=[{"role": "user", "content": blocks[2:]}])
    assert error_message(caught.value) == "A maximum of 4 blocks with cache_control may be provided. Found 5."
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    # Four is allowed.
    client.messages.create(model=SONNET, max_tokens=16, system=blocks[:2],
                           messages=[{"role": "user", "content": blocks[2:4]}])


def test_a_bad_cache_control_is_a_400(cached: tuple[FakeClaude, anthropic.Anthropic]) -> None:
    _, client = cached
    for control, where in (({"type": "ephemeral", "ttl": "2h"}, "ttl"), ({"type": "forever"}, "type")):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(
                model=SONNET, max_tokens=16,
                system=[{"type": "text", "text": "x", "cache_control": control}],  # type: ignore[typeddict-item]
                messages=[{"role": "user", "content": "hi"}],
            )
        assert f"system.0.cache_control.{where}" in error_message(caught.value)


def test_cached_reads_do_not_count_toward_the_input_token_limit(clock: Clock) -> None:
    with FakeClaude(options=FakeOptions(itpm=2000), clock=clock) as fake, anthropic.Anthropic(
        api_key="t", base_url=fake.base_url, max_retries=0
    ) as client:
        _ask(client, "a")  # ~1,500 tokens written: most of the minute's 2,000
        for job in ("b", "c", "d"):
            assert _usage(_ask(client, job))[2] > 1024
        with pytest.raises(anthropic.RateLimitError):  # the same prompt uncached is counted whole
            _ask(client, "e", shared=SHARED + " (changed)")


def test_cache_minimums_from_the_command_line() -> None:
    assert parse_cache_min_tokens("haiku=2048, claude-opus-5-5=1024") == {"haiku": 2048, "claude-opus-5-5": 1024}
    assert FakeOptions(cache_min_tokens={"haiku": 2048}).cache_min_tokens == {
        "haiku": 2048, "sonnet": 1024, "opus": 4096}
    for bad in ("haiku", "haiku=0", "haiku=lots", "=5"):
        with pytest.raises(ValueError, match="NAME=TOKENS"):
            parse_cache_min_tokens(bad)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.fake_claude", "--cache-min-tokens", "haiku=lots"],
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode == 2
    assert "--cache-min-tokens" in result.stderr and "haiku=lots" in result.stderr


@pytest.mark.parametrize(("ttl", "hits_after_ten_minutes"), [("5m", False), ("1h", True)])
def test_the_client_asks_for_the_tiers_ttl(clock: Clock, ttl: str, hits_after_ten_minutes: bool) -> None:
    """switchyard's client sends the tier's configured TTL on its breakpoint: a 1-hour entry is
    still read ten minutes later, a 5-minute one is written again."""
    from pipeline.claude.client import ClaudeClient

    with FakeClaude(clock=clock) as fc:
        client = ClaudeClient(api_key="t", base_url=fc.base_url, attempts=1, sleep=lambda s: None)
        try:
            def ask() -> Any:
                result = client.call(tier="sonnet", model="claude-sonnet-5-5", system=SHARED, user="Refund me",
                                     max_tokens=50, cache_system=True, cache_ttl=ttl)
                return result.attempts[-1].usage

            assert ask().cache_creation_input_tokens > 0
            clock.now += 600
            again = ask()
        finally:
            client.close()
    assert (again.cache_read_input_tokens > 0) is hits_after_ten_minutes
    assert (again.cache_creation_input_tokens > 0) is not hits_after_ten_minutes
