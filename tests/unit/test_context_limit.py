"""A job too large for the model's context is rejected when it is enqueued, with its size and the
limit, and never sent to fail later. The limit leaves room for everything each stage adds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.errors import JobInputError
from pipeline.flow.prompts import Prompt, format_check_prompt, triage_prompt, work_prompt
from pipeline.intake.enqueue import enqueue_file
from pipeline.intake.jobspec import (
    FEEDBACK_MAX_CHARS,
    PROMPT_SCAFFOLD_TOKENS,
    estimate_text_tokens,
    max_job_tokens,
    parse_job,
)
from pipeline.models import Batch, JobKind

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}


def payload_for(kind: JobKind, text: str) -> dict:
    return {JobKind.CLASSIFY: {"text": text, "labels": ["a", "b"]}, JobKind.EXTRACT: {"text": text, "schema": SCHEMA},
            JobKind.DRAFT: {"instructions": text, "context": "c"}, JobKind.GENERATE: {"prompt": text}}[kind]


def estimate_tokens(payload: dict) -> int:
    """A job's estimated size as parse_job counts it: each text field, and each other field as JSON."""
    return sum(estimate_text_tokens(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
               for v in payload.values())


def prompt_tokens(p: Prompt) -> int:
    return estimate_text_tokens(p.system) + estimate_text_tokens(p.user)


@pytest.mark.parametrize("kind", list(JobKind))
def test_the_prompts_scaffolding_fits_its_allowance(kind: JobKind) -> None:
    payload = payload_for(kind, "x")
    job = estimate_tokens(payload)
    for prompt in (triage_prompt(kind, payload), work_prompt(kind, payload, feedback="f"),
                   format_check_prompt(kind, payload, "o")):
        assert prompt_tokens(prompt) - job <= PROMPT_SCAFFOLD_TOKENS


@pytest.mark.parametrize("kind", list(JobKind))
def test_a_job_at_the_limit_fits_every_stage(kind: JobKind, models: ModelConfig) -> None:
    limit = max_job_tokens(models)
    base = estimate_tokens(payload_for(kind, ""))
    payload = payload_for(kind, "w" * int((limit - base) * 3.5))
    assert limit - 2 <= estimate_tokens(payload) <= limit
    parse_job({"kind": kind.value, **payload}, work_tiers=models.work_tiers, max_tokens=limit)  # accepted

    context = min(t.context_tokens for t in models.tiers.values())
    lim = models.limits
    longest_answer = "a" * int(lim.work_max_tokens * 3.5)
    longest_feedback = "problem; " * FEEDBACK_MAX_CHARS
    for prompt, max_tokens in ((triage_prompt(kind, payload), lim.triage_max_tokens),
                               (work_prompt(kind, payload, feedback=longest_feedback), lim.work_max_tokens),
                               (format_check_prompt(kind, payload, longest_answer), lim.format_check_max_tokens)):
        assert prompt_tokens(prompt) + max_tokens <= context


def test_text_outside_ascii_is_not_undercounted() -> None:
    assert estimate_text_tokens("a" * 3500) == 1000
    assert estimate_text_tokens("漢" * 1000) >= 1000  # a CJK character is about a token, or more
    assert estimate_text_tokens("😀" * 1000) >= 2000


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_a_job_too_large_is_rejected_at_enqueue_with_its_size_and_the_limit(
        skip_invalid: bool, sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path) -> None:
    limit = max_job_tokens(models)
    huge = {"key": "huge", "kind": "generate", "prompt": "y" * int(limit * 3.5 + 100)}
    small = {"key": "small", "kind": "generate", "prompt": "hello"}
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(small) + "\n" + json.dumps(huge) + "\n")
    name = f"too-large-{skip_invalid}"
    if not skip_invalid:
        with pytest.raises(JobInputError) as info:
            enqueue_file(sessions, path, batch=name, config=models)
        message = str(info.value)
        assert f"{path}, line 2: job is too large for the model's context" in message
        assert f"limit {limit:,}" in message
        assert "about " in message
        with sessions() as s:  # nothing written, not even the good line
            assert s.scalar(select(func.count()).select_from(Batch).where(Batch.name == name)) == 0
    else:
        report = enqueue_file(sessions, path, batch=name, config=models, skip_invalid=True)
        assert report.accepted == 1
        assert report.invalid_count == 1
        assert report.invalid[0].line == 2
        assert f"limit {limit:,}" in report.invalid[0].reason
