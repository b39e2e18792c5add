"""Shadow evaluation's settings: the configuration's [routing] keys, a task's field and a batch's
option; each bad value is one sentence naming where it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError, InvalidInput, JobInputError
from pipeline.intake import tasks
from pipeline.intake.enqueue import enqueue_items
from pipeline.quality.sample import effective_rate
from tests.cli import invoke


def raw(**routing: Any) -> dict[str, Any]:
    tiers = {n: {"model": f"claude-{n}-9", "input_per_mtok": 1, "output_per_mtok": 5} for n in ("haiku", "sonnet",
                                                                                              "opus")}
    return {"tiers": tiers, "routing": routing}


def test_the_defaults_sample_nothing_and_compare_with_the_top_of_the_chain() -> None:
    config = load_config()
    assert config.routing.shadow_rate == 0.0
    assert config.routing.reference == config.top_tier == "opus"
    assert config.routing.judge == "opus"


def test_reference_and_judge_tiers_can_be_configured() -> None:
    routing = parse_config(raw(shadow_rate=0.05, reference_tier="sonnet", judge_tier="haiku")).routing
    assert (routing.shadow_rate, routing.reference, routing.judge) == (0.05, "sonnet", "haiku")
    assert parse_config(raw(shadow_rate=1)).routing.shadow_rate == 1.0


@pytest.mark.parametrize(("routing", "expected"), [
    ({"shadow_rate": 1.5}, "my.toml [routing]: 'shadow_rate' must be a number from 0 to 1 (the share of jobs "
                           "sampled), not 1.5"),
    ({"shadow_rate": -0.1}, "my.toml [routing]: 'shadow_rate' must be a number from 0 to 1"),
    ({"shadow_rate": "5%"}, "my.toml [routing]: 'shadow_rate' must be a number from 0 to 1"),
    ({"shadow_rate": True}, "my.toml [routing]: 'shadow_rate' must be a number from 0 to 1"),
    ({"reference_tier": "gpt"}, "my.toml [routing]: 'reference_tier' 'gpt' is not a work tier: expected one of "
                                "sonnet, opus"),
    ({"reference_tier": "haiku"}, "my.toml [routing]: 'reference_tier' 'haiku' is not a work tier"),
    ({"judge_tier": "gpt"}, "my.toml [routing]: 'judge_tier' 'gpt' has no [tiers.gpt] table"),
    ({"judge_tier": 3}, "my.toml [routing]: 'judge_tier' must be a tier name (a string), not 3"),
])
def test_a_bad_value_is_one_sentence_naming_the_file_and_key(routing: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw(**routing), source="my.toml")
    assert str(exc.value).startswith(expected)
    assert "\n" not in str(exc.value)


def test_the_batch_rate_wins_over_the_task_over_the_configuration() -> None:
    assert effective_rate(configured=0.1) == 0.1
    assert effective_rate(configured=0.1, task=0.5) == 0.5
    assert effective_rate(configured=0.1, task=0.5, batch=0.0) == 0.0


def test_a_task_takes_a_shadow_rate_between_0_and_1() -> None:
    base = {"name": "t", "kind": "generate", "instructions": "Say hi."}
    spec = tasks.parse_task({**base, "shadow_rate": 0.25}, work_tiers=("sonnet", "opus"))
    assert spec.shadow_rate == 0.25 and spec.definition()["shadow_rate"] == 0.25
    assert "shadow_rate" not in tasks.parse_task(base, work_tiers=("sonnet", "opus")).definition()
    for bad in (2, -1, "half", False):
        with pytest.raises(JobInputError, match="field 'shadow_rate' must be a number from 0 to 1"):
            tasks.parse_task({**base, "shadow_rate": bad}, work_tiers=("sonnet", "opus"))


def test_a_batch_rate_outside_0_to_1_is_refused_before_anything_is_written() -> None:
    def nothing() -> Any:
        raise AssertionError("no session should be opened")

    with pytest.raises(InvalidInput, match=r"the shadow rate must be a number from 0 to 1, not 1\.01$"):
        enqueue_items(nothing, lambda pos: iter(()), batch="b", shadow_rate=1.01)


def test_enqueue_refuses_a_bad_shadow_rate_in_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"kind": "generate", "prompt": "hi"}) + "\n")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/never.sqlite")
    code, _out, err = invoke(monkeypatch, capsys, "enqueue", str(path), "--shadow-rate", "3")
    assert code == 2
    assert err.strip() == "error: --shadow-rate must be a number from 0 to 1 (the share of jobs shadowed), not 3.0"
    assert not (tmp_path / "never.sqlite").exists()


def test_a_bad_configuration_file_stops_quality_with_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "pipeline" / "defaults.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("shadow_rate = 0.0", "shadow_rate = 7"))
    monkeypatch.setenv("SWITCHYARD_CONFIG", str(bad))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/never.sqlite")
    code, _out, err = invoke(monkeypatch, capsys, "quality", "--json")
    assert code == 2
    assert err.strip() == (f"error: {bad} [routing]: 'shadow_rate' must be a number from 0 to 1 (the share of jobs "
                           f"sampled), not 7")
