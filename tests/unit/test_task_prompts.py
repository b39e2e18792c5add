"""Prompts of a job under a task: the task's shared part first (system), the job's own content last
(user), and a cache breakpoint at the end of the shared part once it reaches the tier's minimum.
Jobs without a task keep their prompts, byte for byte."""

from __future__ import annotations

from typing import Any

from pipeline.config import ModelConfig
from pipeline.fake_claude.prompt import read_prompt
from pipeline.flow.prompts import Shared, format_check_prompt, triage_prompt, work_prompt
from pipeline.intake.jobspec import estimate_text_tokens
from pipeline.intake.tasks import parse_task
from pipeline.models import JobKind

DEFINITION: dict[str, Any] = parse_task({
    "name": "topic", "kind": "classify", "instructions": "Sort tickets by what the customer needs.",
    "labels": [{"name": "billing", "description": "Money owed or paid."},
               {"name": "bug", "description": "Something is broken."}],
    "examples": [{"input": "charged twice", "output": "billing"}],
}, work_tiers=("sonnet", "opus")).definition()
PAYLOAD = {"text": "The app crashes when I export.", "labels": ["billing", "bug"]}


def test_the_shared_part_is_the_system_and_the_job_is_the_user_message() -> None:
    shared = Shared(DEFINITION, 1024)
    prompt = work_prompt(JobKind.CLASSIFY, PAYLOAD, shared=shared)
    assert prompt.user == "<text>\nThe app crashes when I export.\n</text>"
    assert prompt.system.startswith(work_prompt(JobKind.CLASSIFY, PAYLOAD).system)
    for part in ("<task_instructions>\nSort tickets", "- billing: Money owed or paid.", "- bug: Something is broken.",
                 "<input>\ncharged twice\n</input>",
                 "<expected_output>\nbilling\n</expected_output>", '<labels>\n["billing", "bug"]\n</labels>'):
        assert part in prompt.system, part
    # The system is the same bytes for every job of the task; only the user message differs.
    other = work_prompt(JobKind.CLASSIFY, {**PAYLOAD, "text": "Refund me"}, shared=shared)
    assert other.system == prompt.system and other.user != prompt.user
    # Feedback on a retry is the job's own, after its text.
    retry = work_prompt(JobKind.CLASSIFY, PAYLOAD, feedback="not a label", shared=shared)
    assert retry.system == prompt.system and retry.user.startswith(prompt.user) and "<feedback>" in retry.user


def test_triage_says_what_the_task_is() -> None:
    prompt = triage_prompt(JobKind.CLASSIFY, PAYLOAD, shared=Shared(DEFINITION, 4096))
    assert "<kind>\nclassify\n</kind>" in prompt.system and "<task_instructions>" in prompt.system
    assert prompt.user == "<text>\nThe app crashes when I export.\n</text>"
    checked = format_check_prompt(JobKind.DRAFT, {"instructions": "Apologise"}, "Sorry!",
                                  shared=Shared({"instructions": "Be brief.", "examples": []}, 4096))
    assert "<task_instructions>\nBe brief.\n</task_instructions>" in checked.system
    assert checked.user == "<instructions>\nApologise\n</instructions>\n<output>\nSorry!\n</output>"


def test_the_breakpoint_is_set_only_from_the_tiers_minimum() -> None:
    prompt = work_prompt(JobKind.CLASSIFY, PAYLOAD, shared=Shared(DEFINITION, 1024))
    size = estimate_text_tokens(prompt.system)
    assert size < 1024 and not prompt.cache
    assert work_prompt(JobKind.CLASSIFY, PAYLOAD, shared=Shared(DEFINITION, size)).cache
    assert not work_prompt(JobKind.CLASSIFY, PAYLOAD, shared=Shared(DEFINITION, size + 1)).cache
    long = {**DEFINITION, "instructions": "Read every word of the ticket. " * 600}
    assert work_prompt(JobKind.CLASSIFY, PAYLOAD, shared=Shared(long, 4096)).cache
    # Caching off in the configuration: no minimum, no breakpoint, however long the shared part;
    # the prompt is otherwise the same bytes.
    for prompt_of in (work_prompt, triage_prompt):
        off, on = prompt_of(JobKind.CLASSIFY, PAYLOAD, shared=Shared(long, None)), prompt_of(
            JobKind.CLASSIFY, PAYLOAD, shared=Shared(long, 0))
        assert on.cache and not off.cache and (off.system, off.user) == (on.system, on.user)


def test_jobs_without_a_task_keep_their_prompts() -> None:
    prompt = work_prompt(JobKind.CLASSIFY, PAYLOAD)
    assert not prompt.cache
    assert prompt.user == '<text>\nThe app crashes when I export.\n</text>\n<labels>\n["billing", "bug"]\n</labels>'
    assert prompt.system.endswith("[switchyard:classify]")


def test_the_fake_reads_a_tasks_labels_from_the_system_blocks() -> None:
    prompt = work_prompt(JobKind.CLASSIFY, PAYLOAD, shared=Shared(DEFINITION, 0))
    assert prompt.cache
    body = {"system": [{"type": "text", "text": prompt.system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": prompt.user}]}
    read = read_prompt(body)
    assert read.purpose == "classify" and read.section("labels") == '["billing", "bug"]'
    assert read.section("text") == "The app crashes when I export."


def test_the_tiers_minimum_cacheable_length(models: ModelConfig) -> None:
    assert models.min_cache_tokens("sonnet") == 1024
    assert models.min_cache_tokens("opus") == 4096
    assert models.min_cache_tokens(models.triage_tier) == 4096
