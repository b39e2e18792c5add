"""Economy mode's pure parts: its configuration, the batch price, and a batch result read as a
call's outcome; and the dispatcher's wake-up on Postgres (the flow itself runs end to end in
tests/faults/test_economy.py)."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any

import pytest

from pipeline.claude.batches import outcome_of
from pipeline.claude.client import CallResult
from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import load_config, parse_config
from pipeline.errors import CallFailed, ConfigError


def _raw() -> dict:
    return tomllib.loads(resources.files("pipeline").joinpath("defaults.toml").read_text())


def test_the_bundled_configuration_has_the_batch_discount_and_economy_defaults() -> None:
    models = load_config()
    assert models.batch_multiplier == Decimal("0.5")
    assert (models.economy.max_requests, models.economy.max_age_s) == (100_000, 60.0)


@pytest.mark.parametrize(("table", "message"), [
    ({"max_age_s": 0}, "'max_age_s' must be a number of seconds above 0"),
    ({"max_requests": 200_000}, "at most 100000"),
    ({"max_age": 5}, "unknown key 'max_age'"),
])
def test_a_bad_economy_setting_is_one_sentence_naming_it(table: dict, message: str) -> None:
    raw = _raw()
    raw["economy"] = table
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="x.toml")


def test_the_batch_price_is_half_and_stacks_with_cache_prices() -> None:
    models = load_config()
    sonnet = models.tier("sonnet")
    usage = Usage(input_tokens=1000, output_tokens=200, cache_creation_input_tokens=3000, cache_read_input_tokens=5000)
    assert call_cost(sonnet, usage, config=models, batch=True) * 2 == call_cost(sonnet, usage, config=models)
    read = Usage(cache_read_input_tokens=1_000_000)
    # A cache read in a batch: 0.1 x 0.5 of the input price.
    assert call_cost(sonnet, read, config=models, batch=True) == sonnet.input_per_mtok * Decimal("0.05")


def test_a_succeeded_result_is_one_ok_attempt_from_submission_to_result() -> None:
    at = datetime(2026, 12, 7, tzinfo=UTC)
    message = {"id": "msg_1", "content": [{"type": "text", "text": "billing"}], "stop_reason": "end_turn",
               "usage": {"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 0,
                         "cache_read_input_tokens": 7}}
    out = outcome_of({"type": "succeeded", "message": message}, submitted_at=at, result_at=at + timedelta(seconds=3),
                     message_batch_id="msgbatch_x", request_id=5)
    assert isinstance(out, CallResult) and out.text == "billing"
    (a,) = out.attempts
    assert (a.ok, a.latency_ms, a.message_batch_id, a.economy_request_id) == (True, 3000.0, "msgbatch_x", 5)
    assert a.usage.cache_read_input_tokens == 7


@pytest.mark.parametrize(("error_type", "status", "transient"), [
    ("overloaded_error", 529, True), ("api_error", 500, True), ("invalid_request_error", 400, False)])
def test_an_errored_result_is_the_synchronous_error_it_carries(error_type: str, status: int, transient: bool) -> None:
    at = datetime(2026, 12, 7, tzinfo=UTC)
    body = {"type": "error", "error": {"type": error_type, "message": "no"}, "request_id": "req_1"}
    out = outcome_of({"type": "errored", "error": body}, submitted_at=at, result_at=at, message_batch_id="m",
                     request_id=1)
    assert isinstance(out, CallFailed)
    assert (out.status, out.error_type, out.transient) == (status, error_type, transient)
    assert out.attempts[0].error_message == f"{status} {error_type}: no"


def test_a_message_batchs_answers_wake_no_more_jobs_than_there_are_places_in_flight(
        sessions: Any, models: Any, tmp_path: Any) -> None:
    """100,000 answers of one message batch must not become 100,000 broker messages at once: a
    round wakes as many parked jobs as max_in_flight leaves room for, oldest first."""
    import json

    from sqlalchemy import select, text

    from pipeline.claude.batches import BatchClient
    from pipeline.claude.client import ClaudeClient
    from pipeline.flow.economy import Economy
    from pipeline.flow.stages import Pipeline
    from pipeline.intake.enqueue import enqueue_file
    from pipeline.models import Job

    path = tmp_path / "parked.jsonl"
    path.write_text("".join(json.dumps({"key": f"p{i}", "kind": "generate", "prompt": f"item {i}"}) + "\n"
                            for i in range(10)))
    batch_id = enqueue_file(sessions, path, batch="wake-bound", config=models, mode="economy").batch_id
    with sessions() as s:
        # Ten jobs parked at triage, each with its answer stored and unread.
        s.execute(text("UPDATE jobs SET status = 'triaging', parked = true, not_before = now() + interval '1 hour' "
                       "WHERE batch_id = :b"), {"b": batch_id})
        s.execute(text("INSERT INTO economy_requests (job_id, job_version, purpose, tier, model, round, state, params, "
                       "result_type, result, created_at, result_at) SELECT id, version, 'triage', 'haiku', 'm', 1, "
                       "'done', '{}', 'succeeded', '{}', now(), now() FROM jobs WHERE batch_id = :b"), {"b": batch_id})
        s.commit()
    client = ClaudeClient(api_key="test", base_url="http://127.0.0.1:9", attempts=1)
    p = Pipeline(sessions=sessions, client=client, models=models, max_deliveries=3)
    economy = Economy(p, BatchClient(api_key="test", base_url="http://127.0.0.1:9"), models.economy,
                      max_in_flight=4)

    def woken() -> list[int]:
        with sessions() as s:
            return list(s.scalars(select(Job.id).where(Job.batch_id == batch_id, Job.not_before <= text("now()"))
                                  .order_by(Job.id)))
    try:
        assert economy.wake() == 4
        first = woken()
        assert len(first) == 4
        assert economy.wake() == 0  # the four woken are in flight again: no room left
        economy.max_in_flight = 10
        assert economy.wake() == 6
        assert set(first) < set(woken()) and len(woken()) == 10
    finally:
        client.close()
