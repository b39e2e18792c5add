"""Haiku as a work tier: the sample cascade policy, and every part that maps tiers to queues under
it (the dispatcher's and sweeper's hand-offs, `status`, pinned tiers, `switchyard worker`)."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session

from pipeline.claude.ratelimit import RedisRateLimiter, TierLimits
from pipeline.cli.operate import default_concurrency
from pipeline.config import ModelConfig, load_config
from pipeline.errors import JobInputError
from pipeline.flow.stages import Handoff, handoff_for
from pipeline.intake.jobspec import parse_job
from pipeline.models import JobStatus
from pipeline.queries.ops import gather, queue_in_flight
from pipeline.settings import Settings
from tests.cli import invoke

ROOT = Path(__file__).resolve().parents[2]
CASCADE = ROOT / "pipeline" / "samples" / "cascade.toml"


@pytest.fixture(scope="module")
def cascade() -> ModelConfig:
    return load_config(CASCADE)


def test_the_sample_cascade_differs_from_the_defaults_only_in_its_routing() -> None:
    """Its tiers, prices and limits are copies of the defaults: they must not drift apart."""
    defaults = tomllib.loads(resources.files("pipeline").joinpath("defaults.toml").read_text())
    sample = tomllib.loads(CASCADE.read_text())
    assert {k: v for k, v in sample.items() if k != "routing"} == {k: v for k, v in defaults.items() if k != "routing"}
    assert sample["routing"] == {**defaults["routing"], "easy": "haiku", "escalation": ["haiku", "sonnet", "opus"]}
    # ...and it ships in the package (the demo and the image read it from there).
    assert resources.files("pipeline").joinpath("samples/cascade.toml").is_file()


def test_the_cascade_gives_haiku_a_work_queue_and_the_defaults_do_not(cascade: ModelConfig,
                                                                        models: ModelConfig) -> None:
    assert cascade.work_tiers == ("haiku", "sonnet", "opus")
    assert cascade.queues == ["triage", "haiku", "sonnet", "opus", "validate"]
    # The haiku queue calls the haiku tier, as triage and the format check do: one budget.
    assert {q: cascade.queue_tier(q) for q in cascade.queues} == {
        "triage": "haiku", "haiku": "haiku", "sonnet": "sonnet", "opus": "opus", "validate": "haiku"}
    assert cascade.top_tier == "opus"
    assert models.queues == ["triage", "sonnet", "opus", "validate"]
    assert (cascade.source, models.source) == (str(CASCADE), "defaults.toml")


def test_the_dispatcher_and_sweeper_send_haiku_work_to_the_haiku_queue() -> None:
    assert handoff_for(7, JobStatus.WORKING, "haiku") == Handoff("work", 7, "haiku")
    assert handoff_for(7, JobStatus.TRIAGING, None) == Handoff("triage", 7, "triage")
    assert handoff_for(7, JobStatus.VALIDATING, "haiku") == Handoff("validate", 7, "validate")
    in_flight = {"triaging": {"-": 4}, "working": {"haiku": 3, "sonnet": 2}, "validating": {"haiku": 1, "opus": 5}}
    assert [queue_in_flight(q, in_flight) for q in ("triage", "haiku", "sonnet", "opus", "validate")] == [4, 3, 2, 0, 6]


def test_a_job_may_pin_haiku_only_where_haiku_works(cascade: ModelConfig, models: ModelConfig) -> None:
    job = {"kind": "generate", "prompt": "Three taglines", "tier": "haiku"}
    assert parse_job(job, work_tiers=cascade.work_tiers).tier == "haiku"
    with pytest.raises(JobInputError, match="unknown tier 'haiku': expected one of sonnet, opus"):
        parse_job(job, work_tiers=models.work_tiers)


def test_work_queues_get_the_work_concurrency_haiku_included() -> None:
    assert [default_concurrency(q) for q in ("triage", "haiku", "sonnet", "opus", "validate")] == [32, 64, 64, 64, 32]


def test_an_empty_switchyard_config_means_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose passes an unset SWITCHYARD_CONFIG through as an empty string."""
    monkeypatch.setenv("SWITCHYARD_CONFIG", "")
    assert Settings().config_path is None and Settings().models.source == "defaults.toml"
    monkeypatch.setenv("SWITCHYARD_CONFIG", str(CASCADE))
    assert Settings().models.work_tiers == ("haiku", "sonnet", "opus")


def test_status_shows_the_haiku_queue_and_its_tier_pause(cascade: ModelConfig, broker_url: str, db: Session) -> None:
    client = redis.Redis.from_url(broker_url)
    client.delete("haiku", *RedisRateLimiter.keys("haiku"))
    client.rpush("haiku", b"{}", b"{}")
    limiter = RedisRateLimiter(client, {t: TierLimits() for t in cascade.tiers}, window_s=60)
    limiter.penalize("haiku", retry_after=30)
    try:
        st = gather(client, db, cascade, limiter)
    finally:
        client.delete("haiku", *RedisRateLimiter.keys("haiku"))
    queues = {q.queue: q for q in st.queues}
    assert list(queues) == ["triage", "haiku", "sonnet", "opus", "validate"]
    assert queues["haiku"].depth == 2
    # A 429 at Haiku pauses every queue that calls it: triage, the haiku work and the format check.
    assert {q: queues[q].paused_s > 20 for q in queues} == {
        "triage": True, "haiku": True, "sonnet": False, "opus": False, "validate": True}


@pytest.fixture
def switchyard(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
               tmp_path: Path) -> Callable[..., tuple[int, str, str]]:
    def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
        for name in [k for k in os.environ if k.startswith(("ANTHROPIC_", "SWITCHYARD_"))]:
            monkeypatch.delenv(name)
        for name, value in {"DATABASE_URL": f"sqlite:///{tmp_path}/w.sqlite", "BROKER_URL": "memory://",
                            "COLUMNS": "200", **env}.items():
            monkeypatch.setenv(name, value)
        return invoke(monkeypatch, capsys, *args)

    return run


def test_worker_tier_haiku_names_the_policy_that_gives_haiku_no_queue(
        switchyard: Callable[..., tuple[int, str, str]]) -> None:
    with socket.socket() as s:  # a port nothing listens on: the Claude check fails at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": closed}
    code, _, err = switchyard("worker", "--tier", "haiku", env=env)
    assert code == 2
    assert err.strip() == ("error: tier 'haiku' has no work queue under defaults.toml: its [routing] sends no job "
                           "there (the queues are triage, sonnet, opus, validate); point SWITCHYARD_CONFIG at a "
                           "policy that does, such as pipeline/samples/cascade.toml"), err
    code, _, err = switchyard("worker", "--tier", "haiku", env={**env, "SWITCHYARD_CONFIG": str(CASCADE)})
    # Past the queue check: the worker got as far as checking the Claude endpoint for Haiku's model.
    assert code == 2 and "cannot reach the Claude API" in err, err
    code, _, err = switchyard("worker", "--tier", "gpt", env={**env, "SWITCHYARD_CONFIG": str(CASCADE)})
    assert err.strip() == "error: unknown tier 'gpt': expected one of triage, haiku, sonnet, opus, validate", err
