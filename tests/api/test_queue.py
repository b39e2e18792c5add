"""`GET /v1/queue` and `switchyard status` read the same pauses: each queue shows the 429 pause of
the tier whose budget it spends, as the configuration says (the validate queue spends the format
check's tier, not triage's)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import redis

from pipeline.claude.ratelimit import RedisRateLimiter
from tests.api.conftest import Server, serve

# Far apart, and long enough that neither runs out while a loaded machine starts the CLI.
HAIKU_PAUSE_S, SONNET_PAUSE_S = 300.0, 900.0


@pytest.fixture
def paused(broker_url: str) -> Iterator[float]:
    """haiku and sonnet paused by a 429, in the broker's Redis, as a worker that met one leaves them;
    yields the monotonic time they were paused at."""
    limiter = RedisRateLimiter(redis.Redis.from_url(broker_url), {})
    limiter.penalize("haiku", retry_after=HAIKU_PAUSE_S)
    limiter.penalize("sonnet", retry_after=SONNET_PAUSE_S)
    try:
        yield time.monotonic()
    finally:
        for tier in ("haiku", "sonnet"):
            limiter.redis.delete(*RedisRateLimiter.keys(tier))


@pytest.fixture
def checker_server(database_url: str, broker_url: str, tmp_path: Path) -> Iterator[Server]:
    """A server whose configuration has sonnet, not haiku, make the format check."""
    config = tmp_path / "models.toml"
    defaults = resources.files("pipeline").joinpath("defaults.toml").read_text()
    config.write_text(defaults + '\n[stages]\ntriage_tier = "haiku"\nformat_check_tier = "sonnet"\n')
    with serve(database_url, broker_url, tmp_path, env_extra={"SWITCHYARD_CONFIG": str(config)}) as srv:
        yield srv


def test_each_queue_shows_the_pause_of_the_tier_it_spends(checker_server: Server, paused: float,
                                                          tenant_name: str) -> None:
    def expect(pauses: dict[str, float]) -> None:
        """Each queue shows what is left of its tier's pause: between the pause less the time since
        it was set, and the pause itself (a second of slack for rounding)."""
        since = time.monotonic() - paused
        wanted = {"triage": HAIKU_PAUSE_S, "sonnet": SONNET_PAUSE_S,
                  "validate": SONNET_PAUSE_S}  # the format check's tier, not triage's
        for queue, pause in wanted.items():
            assert pause - since - 1 <= pauses[queue] <= pause + 1, (queue, pauses, since)
        assert pauses["opus"] == 0, pauses

    with checker_server.client(checker_server.make_token(tenant_name)) as c:
        answer = c.get("/v1/queue")
    assert answer.status_code == 200, answer.text
    api = {q["queue"]: q["paused_s"] for q in answer.json()["queues"]}
    expect(api)

    # `switchyard status` maps the queues the same way.
    out = checker_server.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    cli = {q["queue"]: q["paused_s"] for q in json.loads(out.stdout)["queues"]}
    assert cli.keys() == api.keys()
    expect(cli)
