"""The quality model: wrong answers at the configured rates, deterministic per seed, plausible and
valid, noisy triage, and the truth readable in-process. The requests are the prompts switchyard
writes (pipeline.flow.prompts), and the truth is computed from the job's payload alone, so the
tests also check that the fake reads the same job out of the prompt as a test reads out of the
payload."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest

from pipeline.fake_claude import (
    DEFAULT_ERROR_RATES,
    FakeClaude,
    FakeOptions,
    Job,
    QualityModel,
    is_correct,
    parse_error_rates,
    true_difficulty,
    truth,
)
from pipeline.fake_claude.responder import Responder
from pipeline.flow.prompts import Shared, triage_prompt, work_prompt
from pipeline.flow.validation import deterministic_check
from pipeline.models import JobKind
from tests.cli import invoke
from tests.fake_claude.helpers import HAIKU, OPUS, SONNET, http, text_of
from tests.fake_claude.test_purposes import SCHEMAS

HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
LABELS = ["billing", "technical_support", "sales", "shipping", "other"]
MODELS = {"haiku": HAIKU, "sonnet": SONNET, "opus": OPUS}
RATES = {
    "haiku": {"easy": 0.10, "medium": 0.25, "hard": 0.45},
    "sonnet": {"easy": 0.05, "medium": 0.10, "hard": 0.20},
    "opus": {"easy": 0.00, "medium": 0.04, "hard": 0.08},
}
DIFFICULTIES = ("easy", "medium", "hard")


def classify_job(i: int, difficulty: str | None = None) -> dict[str, Any]:
    hint = f" [fake:difficulty={difficulty}]" if difficulty else ""
    return {"text": f"Ticket {i}: my parcel is late and I was charged again.{hint}", "labels": LABELS}


def extract_job(i: int, schema: dict[str, Any]) -> dict[str, Any]:
    return {"text": f"Order {i} from Jane Doe (jane.doe@example.org) in Lisbon on 2026-03-14, total "
                    f"{i}.50 EUR.", "schema": schema}


def body(kind: JobKind, payload: dict[str, Any], model: str, *, triage: bool = False, **extra: Any) -> dict[str, Any]:
    prompt = triage_prompt(kind, payload) if triage else work_prompt(kind, payload, **extra)
    return {"model": model, "max_tokens": 1024, "system": prompt.system,
            "messages": [{"role": "user", "content": prompt.user}]}


def answer_text(responder: Responder, request: dict[str, Any], **extra: Any) -> str:
    outcome = responder.messages(HEADERS, {**request, **extra}, now=0.0)
    assert outcome.response is not None and outcome.status == 200, outcome
    return str(outcome.response.body["content"][0]["text"])


def tolerance(p: float, n: int) -> float:
    """Five standard deviations of a share out of n draws, and a little for rounding."""
    return 5 * math.sqrt(p * (1 - p) / n) + 0.005


# -- the rates are honoured ----------------------------------------------------------------------


def test_each_class_errs_at_its_rate_per_true_difficulty() -> None:
    responder = Responder(FakeOptions(error_rates=RATES, seed=11))
    per_difficulty = 700
    wrong: Counter[tuple[str, str]] = Counter()
    for difficulty in DIFFICULTIES:
        for i in range(per_difficulty):
            payload = classify_job(i, difficulty)
            assert true_difficulty(Job.of(payload)) == difficulty
            for klass, model in MODELS.items():
                text = answer_text(responder, body(JobKind.CLASSIFY, payload, model))
                assert deterministic_check(JobKind.CLASSIFY, payload, text).ok  # type: ignore[union-attr]
                wrong[klass, difficulty] += not is_correct(text, payload, "classify")
    for klass in MODELS:
        for difficulty in DIFFICULTIES:
            rate = RATES[klass][difficulty]
            share = wrong[klass, difficulty] / per_difficulty
            assert abs(share - rate) <= tolerance(rate, per_difficulty), (klass, difficulty, share, rate)
    assert wrong["opus", "easy"] == 0  # a zero rate is exact, not just small


def test_the_classes_err_independently() -> None:
    model = QualityModel({"haiku": {"*": 0.5}, "sonnet": {"*": 0.5}}, seed=2)
    n = 3000
    jobs = [Job.of(classify_job(i)) for i in range(n)]
    haiku = [model.answer(job, "classify", "haiku").wrong for job in jobs]
    sonnet = [model.answer(job, "classify", "sonnet").wrong for job in jobs]
    both = sum(h and s for h, s in zip(haiku, sonnet, strict=True)) / n
    assert abs(sum(haiku) / n - 0.5) <= tolerance(0.5, n)
    assert abs(both - 0.25) <= tolerance(0.25, n)


def test_the_default_rates_make_haiku_worst_and_opus_best_and_grow_with_difficulty() -> None:
    model = QualityModel(parse_error_rates("default"), seed=0)
    jobs = [Job.of({"text": f"job {i} " + "words " * (i % 400), "labels": LABELS}) for i in range(1500)]
    assert {true_difficulty(job) for job in jobs} == set(DIFFICULTIES)  # the text alone spreads them
    share = {klass: sum(model.answer(job, "classify", klass).wrong for job in jobs) / len(jobs) for klass in MODELS}
    assert share["haiku"] > share["sonnet"] > share["opus"] > 0
    for klass, rates in DEFAULT_ERROR_RATES.items():
        assert rates["easy"] < rates["medium"] < rates["hard"], klass
    assert DEFAULT_ERROR_RATES["haiku"]["hard"] > DEFAULT_ERROR_RATES["sonnet"]["hard"] > DEFAULT_ERROR_RATES[
        "opus"]["hard"]


def test_off_by_default_every_answer_is_the_truth() -> None:
    responder = Responder(FakeOptions())
    for i in range(200):
        payload = classify_job(i, DIFFICULTIES[i % 3])
        for model in MODELS.values():
            assert is_correct(answer_text(responder, body(JobKind.CLASSIFY, payload, model)), payload, "classify")
        extract = extract_job(i, SCHEMAS["nested"])
        assert is_correct(answer_text(responder, body(JobKind.EXTRACT, extract, HAIKU)), extract, "extract")


# -- deterministic per seed ----------------------------------------------------------------------


def wrong_set(seed: int, n: int = 400) -> set[int]:
    responder = Responder(FakeOptions(error_rates={"haiku": {"*": 0.3}}, seed=seed))
    return {i for i in range(n) if not is_correct(
        answer_text(responder, body(JobKind.CLASSIFY, classify_job(i), HAIKU)), classify_job(i), "classify")}


def test_the_same_seed_gives_the_same_wrong_answers_and_another_seed_others() -> None:
    first, again, other = wrong_set(5), wrong_set(5), wrong_set(6)
    assert first == again
    assert first != other
    # Independent draws: about 0.3 * 0.3 of the jobs are wrong under both seeds, not 0.3.
    assert len(first & other) < 0.6 * len(first)


def test_retries_and_repeats_get_the_same_answer() -> None:
    responder = Responder(FakeOptions(error_rates={"*": 1.0}, seed=1))
    payload = classify_job(3)
    request = body(JobKind.CLASSIFY, payload, HAIKU)
    first = answer_text(responder, request)
    assert not is_correct(first, payload, "classify")
    assert answer_text(responder, request) == first
    # A retry after a validation failure carries feedback: the job, and so its answer, is the same.
    retry = body(JobKind.CLASSIFY, payload, HAIKU, feedback="label 'x' is not one of the labels")
    assert answer_text(responder, retry) == first
    # Another model id of the same class, too.
    assert answer_text(responder, {**request, "model": "claude-haiku-4-5"}) == first


def test_a_task_job_has_the_same_truth_as_its_payload_says() -> None:
    """Under a task the labels sit in the shared system prompt: the job is still the same job."""
    definition = {"instructions": "Route the ticket.",
                  "labels": [{"name": name, "description": f"about {name}"} for name in LABELS]}
    responder = Responder(FakeOptions(error_rates={"haiku": {"*": 0.5}}, seed=4))
    for i in range(60):
        own = {"text": classify_job(i)["text"]}
        prompt = work_prompt(JobKind.CLASSIFY, own, shared=Shared(definition, min_cache_tokens=10**6))
        request = {"model": HAIKU, "max_tokens": 100, "system": prompt.system,
                   "messages": [{"role": "user", "content": prompt.user}]}
        plain = answer_text(responder, body(JobKind.CLASSIFY, classify_job(i), HAIKU))
        assert answer_text(responder, request) == plain
        assert is_correct(plain, own, "classify", labels=LABELS) == is_correct(plain, classify_job(i), "classify")


# -- wrong answers are plausible and valid ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("structured", [False, True], ids=["plain", "output_config"])
def test_wrong_extractions_are_valid_and_differ_in_a_field(name: str, structured: bool) -> None:
    schema = SCHEMAS[name]
    responder = Responder(FakeOptions(error_rates={"*": 1.0}, seed=9))
    extra = {"output_config": {"format": {"type": "json_schema", "schema": schema}}} if structured else {}
    wrong = 0
    for i in range(40):
        payload = extract_job(i, schema)
        text = answer_text(responder, body(JobKind.EXTRACT, payload, SONNET), **extra)
        verdict = deterministic_check(JobKind.EXTRACT, payload, text)
        assert verdict is not None and verdict.ok, (text, verdict)
        checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        checker.validate(json.loads(text))
        true = truth(payload, "extract")
        if not is_correct(text, payload, "extract"):
            wrong += 1
            assert set(json.loads(text)) == set(true)  # the same fields, one of them off
    assert wrong == 40  # each of these schemas leaves some field another valid value


@pytest.mark.parametrize("structured", [False, True], ids=["plain", "output_config"])
def test_wrong_labels_are_other_labels(structured: bool) -> None:
    responder = Responder(FakeOptions(error_rates={"*": 1.0}, seed=9))
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
              "required": ["label"], "additionalProperties": False}
    extra = {"output_config": {"format": {"type": "json_schema", "schema": schema}}} if structured else {}
    seen = set()
    for i in range(100):
        payload = classify_job(i)
        text = answer_text(responder, body(JobKind.CLASSIFY, payload, OPUS), **extra)
        verdict = deterministic_check(JobKind.CLASSIFY, payload, text)
        assert verdict is not None and verdict.ok
        label = json.loads(text)["label"]
        assert label in LABELS and label != truth(payload, "classify")
        seen.add(label)
    assert len(seen) >= 3  # spread over the other labels, not one fixed wrong answer


def test_a_job_with_no_other_valid_answer_is_answered_right() -> None:
    model = QualityModel({"*": 1.0})
    answer = model.answer(Job.of({"text": "anything", "labels": ["only"]}), "classify", "haiku")
    assert (answer.value, answer.wrong) == ("only", False)
    fixed = {"type": "object", "properties": {"v": {"const": 1}, "n": {"type": "null"}}, "required": ["v", "n"]}
    answer = model.answer(Job.of({"text": "anything", "schema": fixed}), "extract", "haiku")
    assert (answer.value, answer.wrong) == ({"v": 1, "n": None}, False)


# -- the truth -------------------------------------------------------------------------------------


def test_a_truth_hint_names_the_label() -> None:
    labels = ["billing", "Technical support", "sales"]
    assert truth({"text": "I was charged twice [fake:truth=sales]", "labels": labels}, "classify") == "sales"
    assert truth("Cannot log in [fake:truth=technical_support]", "classify", labels=labels) == "Technical support"
    # A hint naming no label is ignored, as every malformed hint is: the text decides.
    assert truth("I was charged, billing [fake:truth=nonsense]", "classify", labels=labels) == "billing"
    responder = Responder(FakeOptions())
    payload = {"text": "Something vague [fake:truth=sales]", "labels": labels}
    assert json.loads(answer_text(responder, body(JobKind.CLASSIFY, payload, HAIKU))) == {"label": "sales"}


def test_is_correct_reads_text_values_and_verdicts() -> None:
    payload = {"text": "a billing question [fake:difficulty=hard]", "labels": LABELS}
    assert is_correct("billing", payload, "classify")
    assert is_correct({"label": "billing"}, payload, "classify")
    assert not is_correct('{"label": "sales"}', payload, "classify")
    assert is_correct('{"difficulty": "hard", "confidence": 0.9}', payload, "triage")
    with pytest.raises(ValueError, match="draft"):
        truth(payload, "draft")


# -- triage noise -----------------------------------------------------------------------------------


def test_triage_reports_the_true_difficulty_but_for_the_noise() -> None:
    n = 1500
    jobs = [classify_job(i, DIFFICULTIES[i % 3]) for i in range(n)]
    exact = Responder(FakeOptions())
    noisy = Responder(FakeOptions(triage_noise=0.1, seed=3))
    flipped = 0
    for i, payload in enumerate(jobs):
        request = body(JobKind.CLASSIFY, payload, HAIKU, triage=True)
        verdict = json.loads(answer_text(noisy, request))["difficulty"]
        assert verdict in DIFFICULTIES
        if i % 10 == 0:
            assert json.loads(answer_text(exact, request))["difficulty"] == truth(payload, "triage")
            assert json.loads(answer_text(noisy, request))["difficulty"] == verdict  # deterministic
        flipped += verdict != truth(payload, "triage")
    assert abs(flipped / n - 0.1) <= tolerance(0.1, n)


def test_triage_noise_is_off_the_work_answers() -> None:
    """Noise changes the verdict, never the job's true difficulty, so error rates stay the truth's."""
    model = QualityModel({"haiku": {"hard": 1.0}}, triage_noise=1.0)
    job = Job.of(classify_job(1, "hard"))
    assert model.triage(job) != "hard"
    assert model.answer(job, "classify", "haiku").wrong


# -- over HTTP with the SDK -------------------------------------------------------------------------


def test_over_http_the_answers_and_the_stats_agree_with_the_truth() -> None:
    options = FakeOptions(error_rates=parse_error_rates("default,haiku.hard=0.6"), triage_noise=0.2, seed=8)
    with FakeClaude(options=options) as fake, anthropic.Anthropic(
            api_key="test", base_url=fake.base_url, max_retries=0) as client:
        wrong: Counter[str] = Counter()
        for i in range(60):
            payload = classify_job(i, DIFFICULTIES[i % 3])
            for klass, model in (("haiku", HAIKU), ("opus", OPUS)):
                prompt = work_prompt(JobKind.CLASSIFY, payload)
                text = text_of(client.messages.create(
                    model=model, max_tokens=100, system=prompt.system,
                    messages=[{"role": "user", "content": prompt.user}]))
                expected = fake.quality.answer(Job.of(payload), "classify", klass)
                assert json.loads(text) == {"label": expected.value}
                assert is_correct(text, payload, "classify") is not expected.wrong
                wrong[klass] += expected.wrong
        status, _, stats = http(fake.base_url, "/_fake/stats", method="GET")
    assert status == 200
    quality = stats["quality"]
    assert quality["enabled"] and quality["seed"] == 8 and quality["triage_noise"] == 0.2
    assert quality["error_rates"]["haiku"] == {"easy": 0.05, "medium": 0.15, "hard": 0.6}
    served = quality["answers"]["classify"]
    assert sum(cell["wrong"] for cell in served["haiku"].values()) == wrong["haiku"]
    assert sum(cell["right"] + cell["wrong"] for cell in served["opus"].values()) == 60
    assert served["haiku"]["hard"]["right"] + served["haiku"]["hard"]["wrong"] == 20
    assert wrong["haiku"] > wrong["opus"]


# -- --error-rates ------------------------------------------------------------------------------------


def test_error_rate_specs() -> None:
    assert parse_error_rates("default") == DEFAULT_ERROR_RATES
    rates = parse_error_rates("*.*=0.1, haiku.hard=0.35 ,sonnet.*=0")
    assert rates["haiku"] == {"easy": 0.1, "medium": 0.1, "hard": 0.35}
    assert rates["sonnet"] == {"easy": 0.0, "medium": 0.0, "hard": 0.0}
    assert rates["opus"]["medium"] == 0.1
    assert parse_error_rates("default,opus.hard=0.5")["haiku"] == DEFAULT_ERROR_RATES["haiku"]
    assert parse_error_rates("haiku.easy=1")["opus"] == {"easy": 0.0, "medium": 0.0, "hard": 0.0}


def test_error_rate_files(tmp_path: Path) -> None:
    toml = tmp_path / "rates.toml"
    toml.write_text('[haiku]\nhard = 0.35\neasy = 0.05\n[opus]\n"*" = 0.01\n')
    as_json = tmp_path / "rates.json"
    as_json.write_text(json.dumps({"haiku": {"hard": 0.35, "easy": 0.05}, "opus": 0.01}))
    assert parse_error_rates(str(toml)) == parse_error_rates(str(as_json)) == parse_error_rates(
        "haiku.hard=0.35,haiku.easy=0.05,opus.*=0.01")


@pytest.mark.parametrize(("spec", "says"), [
    ("gpt.hard=0.3", "unknown model class 'gpt'"),
    ("haiku.extreme=0.3", "unknown difficulty 'extreme'"),
    ("haiku.hard=1.5", "outside [0, 1]"),
    ("haiku.hard=-0.1", "outside [0, 1]"),
    ("haiku.hard=nan", "outside [0, 1]"),
    ("haiku.hard=lots", "not a number"),
    ("haiku=0.3", "expected CLASS.DIFFICULTY=RATE"),
    ("missing-rates.toml", "nor a file that exists"),
    ("DIRECTORY", "cannot read the error-rates file"),
    ("BAD_TOML", "is not valid TOML"),
    ("BAD_JSON", "is not valid JSON"),
    ("BAD_CLASS_IN_FILE", "unknown model class 'gemini'"),
    ("BAD_RATE_IN_FILE", "outside [0, 1]"),
])
def test_a_bad_error_rates_option_is_one_sentence(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path, spec: str, says: str) -> None:
    files = {"DIRECTORY": tmp_path, "BAD_TOML": tmp_path / "bad.toml", "BAD_JSON": tmp_path / "bad.json",
             "BAD_CLASS_IN_FILE": tmp_path / "class.toml", "BAD_RATE_IN_FILE": tmp_path / "rate.json"}
    files["BAD_TOML"].write_text("[haiku\nhard = 0.3\n")
    files["BAD_JSON"].write_text('{"haiku": ')
    files["BAD_CLASS_IN_FILE"].write_text("[gemini]\nhard = 0.3\n")
    files["BAD_RATE_IN_FILE"].write_text('{"opus": {"easy": 2}}')
    spec = str(files.get(spec, spec))
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(monkeypatch, capsys, "fake-claude", "--port", "0", "--error-rates", spec)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --error-rates: ") and says in err, err


def test_options_refuse_bad_rates_and_noise() -> None:
    with pytest.raises(ValueError, match="unknown model class 'gpt'"):
        FakeOptions(error_rates={"gpt": {"hard": 0.1}})
    with pytest.raises(ValueError, match="outside"):
        FakeOptions(error_rates={"haiku": {"hard": 2}})
    with pytest.raises(ValueError, match="triage_noise"):
        FakeOptions(triage_noise=1.5)


def test_the_module_cli_refuses_bad_rates_too() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.fake_claude", "--port", "0", "--error-rates", "haiku.hard=7"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=20, check=False,
    )
    assert result.returncode == 2
    assert "--error-rates: the rate 7 for haiku.hard in 'haiku.hard=7' is outside [0, 1]" in result.stderr
