"""The routing policy and triage parsing, garbage included."""

from __future__ import annotations

import time
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.flow.routing import AMBIGUOUS, after_failed_validation, parse_triage, tier_for

POLICY = load_config().routing


@pytest.mark.parametrize(("text", "difficulty", "confidence"), [
    ('{"difficulty": "easy", "confidence": 0.9, "reason": "short"}', "easy", 0.9),
    ('{"difficulty": "MEDIUM", "confidence": 0.75, "reason": "x"}', "medium", 0.75),
    ('Sure! {"difficulty": "hard", "confidence": 1, "reason": "long"} Hope that helps.', "hard", 1.0),
    ('```json\n{"difficulty": "easy", "confidence": 0.8}\n```', "easy", 0.8),
])
def test_parse_triage_reads_verdicts(text: str, difficulty: str, confidence: float) -> None:
    v = parse_triage(text, min_confidence=0.6)
    assert (v.difficulty, v.confidence, v.parsed) == (difficulty, confidence, True)


@pytest.mark.parametrize("text", [
    None, "", "   ", "this job looks hard to me", "{not json}", "[1, 2, 3]", '"hard"',
    '{"difficulty": "impossible", "confidence": 0.9}', '{"difficulty": 3, "confidence": 0.9}',
    '{"difficulty": "easy"}', '{"difficulty": "easy", "confidence": "high"}',
    '{"difficulty": "easy", "confidence": 1.5}', '{"difficulty": "easy", "confidence": -0.1}',
    '{"difficulty": "easy", "confidence": true}', "{" * 5000 + "}" * 5000,
    # More digits than Python converts to an int (its guard against quadratic time).
    '{"difficulty": "easy", "confidence": ' + "1" * 5000 + "}",
])
def test_garbage_triage_is_ambiguous_never_an_error(text: str | None) -> None:
    v = parse_triage(text, min_confidence=0.6)
    assert v.difficulty == AMBIGUOUS
    assert tier_for(v, POLICY) == "opus"


def test_triage_parsing_is_linear_in_the_answer() -> None:
    """Braces that never close: a backtracking search for the object took quadratic time."""
    start = time.thread_time()
    assert parse_triage("{" * 100_000, min_confidence=0.6).difficulty == AMBIGUOUS
    assert time.thread_time() - start < 0.5


def test_low_confidence_is_ambiguous_but_keeps_its_confidence() -> None:
    v = parse_triage('{"difficulty": "easy", "confidence": 0.4, "reason": "unsure"}', min_confidence=0.6)
    assert v.difficulty == AMBIGUOUS and v.confidence == 0.4 and v.parsed
    assert "low confidence" in v.reason


def test_default_policy_maps_difficulty_to_tier() -> None:
    route = {d: tier_for(parse_triage(f'{{"difficulty": "{d}", "confidence": 0.9}}', min_confidence=0.6), POLICY)
             for d in ("easy", "medium", "hard")}
    assert route == {"easy": "sonnet", "medium": "sonnet", "hard": "opus"}


def test_policy_is_configuration() -> None:
    raw = {"tiers": {n: {"model": f"claude-{n}-9", "input_per_mtok": 1, "output_per_mtok": 2}
                     for n in ("haiku", "sonnet", "opus")},
           "routing": {"easy": "sonnet", "medium": "opus", "hard": "opus", "min_confidence": 0.9}}
    policy = parse_config(raw).routing
    v = parse_triage('{"difficulty": "medium", "confidence": 0.95}', min_confidence=policy.min_confidence)
    assert tier_for(v, policy) == "opus"
    assert parse_triage('{"difficulty": "easy", "confidence": 0.85}', min_confidence=0.9).difficulty == AMBIGUOUS


def test_failed_validation_retries_then_escalates_then_fails() -> None:
    assert after_failed_validation("sonnet", 1, POLICY).action == "retry"
    assert after_failed_validation("sonnet", 1, POLICY, retryable=False).action == "fail"
    step = after_failed_validation("sonnet", 2, POLICY)
    assert (step.action, step.tier, step.attempt) == ("escalate", "opus", 1)
    assert after_failed_validation("opus", 1, POLICY).action == "retry"
    assert after_failed_validation("opus", 2, POLICY).action == "fail"


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "needs a [tiers.NAME] table"),
    ({"tiers": {"haiku": {"input_per_mtok": 1, "output_per_mtok": 1}}}, "needs a model id"),
    ({"tiers": {"haiku": {"model": "m", "input_per_mtok": "x", "output_per_mtok": 1}}}, "must be a number"),
    ({"tiers": {"haiku": {"model": "m", "input_per_mtok": 1, "output_per_mtok": 1}}},
     "[routing]: 'easy' is not set, and its default tier 'sonnet' has no [tiers.sonnet] table: set it to one of haiku"),
])
def test_bad_configuration_names_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert message in str(info.value)


def _defaults_with(section: str, **values: object) -> dict:
    """The bundled configuration with keys of one section (``tiers.haiku``, ``routing``...) set."""
    raw = tomllib.loads(resources.files("pipeline").joinpath("defaults.toml").read_text())
    table = raw
    for part in section.split("."):
        table = table.setdefault(part, {})
    table.update(values)
    return raw


@pytest.mark.parametrize(("raw", "message"), [
    (_defaults_with("tiers.haiku", context_tokens="200k"), "[tiers.haiku]: 'context_tokens' must be a whole number"),
    (_defaults_with("tiers.haiku", context_tokens=True), "'context_tokens' must be a whole number"),
    (_defaults_with("tiers.haiku", context_tokens=0), "'context_tokens' must be a whole number of at least 1"),
    (_defaults_with("routing", min_confidence="high"), "[routing]: 'min_confidence' must be a number"),
    (_defaults_with("routing", min_confidence=[1]), "'min_confidence' must be a number"),
    (_defaults_with("routing", retries_per_tier=1.5), "[routing]: 'retries_per_tier' must be a whole number"),
    (_defaults_with("routing", escalation=3), "[routing]: 'escalation' must be a list of tier names"),
    (_defaults_with("routing", escalation="opus"), "'escalation' must be a list of tier names"),
    (_defaults_with("routing", hard=["opus"]), "[routing]: 'hard' must be a tier name"),
    (_defaults_with("limits", work_max_tokens="lots"), "[limits]: 'work_max_tokens' must be a whole number"),
    (_defaults_with("limits", max_tokens=5), "[limits]: unknown key 'max_tokens'"),
    (_defaults_with("pricing", cache_read_multiplier="cheap"), "[pricing]: 'cache_read_multiplier' must be a number"),
    (_defaults_with("stages", triage_tier=7), "[stages]: 'triage_tier' must be a tier name"),
    ({**_defaults_with("routing"), "routing": "opus"}, "[routing] must be a table"),
    ({**_defaults_with("routing"), "limits": [1]}, "[limits] must be a table"),
])
def test_a_mistyped_configuration_value_is_one_sentence(raw: dict, message: str) -> None:
    """Each value of the wrong type or range is named, rather than a ValueError, TypeError or
    AttributeError from deep inside the parse (a traceback from every command that reads it)."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert message in str(info.value)


def test_a_number_too_long_for_python_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(resources.files("pipeline").joinpath("defaults.toml").read_text()
                    .replace("context_tokens = 200000", "context_tokens = " + "9" * 5000, 1))
    with pytest.raises(ConfigError, match="a number has more than 4,300 digits"):
        load_config(path)


def test_swapping_a_model_is_a_config_change(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = (load_config.__module__ and __import__("importlib.resources").resources.files("pipeline")
            .joinpath("defaults.toml").read_text())
    custom = tmp_path / "models.toml"
    custom.write_text(text.replace('model = "claude-opus-5-5"', 'model = "claude-opus-6"'))
    assert load_config(custom).tier("opus").model == "claude-opus-6"


@pytest.mark.parametrize(("raw", "message"), [
    # A tier the policy names must have a [tiers.*] table: the key that names it is the one named.
    (_defaults_with("routing", easy="haku"),
     "models.toml [routing]: 'easy' names tier 'haku', which has no [tiers.haku] table (the tiers are haiku, "
     "sonnet, opus)"),
    (_defaults_with("routing", ambiguous="gpt"), "[routing]: 'ambiguous' names tier 'gpt', which has no [tiers.gpt]"),
    (_defaults_with("routing", escalation=["haiku", "sonet", "opus"]),
     "[routing]: 'escalation' names tier 'sonet', which has no [tiers.sonet] table"),
    (_defaults_with("stages", format_check_tier="mini"),
     "[stages]: 'format_check_tier' names tier 'mini', which has no [tiers.mini] table"),
    # A chain that names a tier twice: after the second, escalating would go back down.
    (_defaults_with("routing", escalation=["haiku", "sonnet", "haiku", "opus"]),
     "[routing]: 'escalation' names tier 'haiku' twice: each tier may appear once in the chain"),
    (_defaults_with("routing", escalation=["opus", "opus"]), "'escalation' names tier 'opus' twice"),
    (_defaults_with("routing", escalation=[]), "[routing]: 'escalation' must name at least one tier"),
    # A work tier's queue is named after it: "triage" and "validate" are the stages' own.
    ({**_defaults_with("routing", medium="triage"),
      "tiers": {**_defaults_with("routing")["tiers"], "triage": {"model": "m", "input_per_mtok": 1,
                                                                 "output_per_mtok": 1}}},
     "[routing]: 'medium' names tier 'triage' as a work tier, but a work tier's queue is named after it and "
     "'triage' is the triage stage's queue"),
    ({**_defaults_with("routing", escalation=["sonnet", "validate"]),
      "tiers": {**_defaults_with("routing")["tiers"], "validate": {"model": "m", "input_per_mtok": 1,
                                                                   "output_per_mtok": 1}}},
     "'escalation' names tier 'validate' as a work tier"),
    # A misspelt key is not a default used in silence.
    (_defaults_with("routing", eazy="haiku"), "[routing]: unknown key 'eazy' (expected some of easy, medium, hard"),
    (_defaults_with("stages", triage="haiku"), "[stages]: unknown key 'triage' (expected some of triage_tier"),
])
def test_a_policy_naming_a_tier_wrongly_is_one_sentence_naming_file_and_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="models.toml")
    text = str(info.value)
    assert message in text and text.startswith("models.toml ") and "\n" not in text, text


def test_haiku_may_work_and_start_the_chain() -> None:
    """Haiku as a work tier: easy jobs go there, and a failed validation climbs haiku -> sonnet -> opus."""
    policy = parse_config(_defaults_with("routing", easy="haiku", escalation=["haiku", "sonnet", "opus"])).routing
    v = parse_triage('{"difficulty": "easy", "confidence": 0.9}', min_confidence=policy.min_confidence)
    assert tier_for(v, policy) == "haiku"
    assert after_failed_validation("haiku", 1, policy).action == "retry"
    step = after_failed_validation("haiku", 2, policy)
    assert (step.action, step.tier, step.attempt) == ("escalate", "sonnet", 1)
    step = after_failed_validation("sonnet", 2, policy)
    assert (step.action, step.tier) == ("escalate", "opus")
    assert after_failed_validation("opus", 2, policy).action == "fail"
