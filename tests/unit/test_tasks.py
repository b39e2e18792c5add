"""Tasks: a definition is checked whole (each refusal one sentence), stored once per content, and
versioned when it changes; the README's example and the bundled sample parse and apply."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.config import ModelConfig
from pipeline.db import transaction
from pipeline.errors import JobInputError, NotFound
from pipeline.intake import tasks
from pipeline.intake.enqueue import enqueue_file
from pipeline.intake.jobspec import CHARS_PER_TOKEN, max_job_tokens
from pipeline.models import Batch, Job, Task
from tests.cluster import SWITCHYARD
from tests.history.helpers import cli_env

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "pipeline" / "samples" / "ticket-topic.toml"
TIERS = ("sonnet", "opus")


def classify(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "topic", "kind": "classify", "instructions": "Sort tickets by topic.",
        "labels": [{"name": "billing", "description": "Money."}, {"name": "bug", "description": "Broken things."}],
        "examples": [{"input": "charged twice", "output": "billing"}],
    }
    return {**base, **changes}


def extract(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "invoice", "kind": "extract", "instructions": "Pull the invoice number.",
        "schema": {"type": "object", "required": ["number"], "properties": {"number": {"type": "string"}}},
        "examples": [{"input": "Invoice INV-1", "output": {"number": "INV-1"}}],
    }
    return {**base, **changes}


def refusal(obj: Any) -> str:
    with pytest.raises(JobInputError) as caught:
        tasks.parse_task(obj, work_tiers=TIERS)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- parsing ---------------------------------------------------------------------------------------


def test_a_classify_task_is_normalised_and_hashed_by_content() -> None:
    spec = tasks.parse_task(classify(max_tokens=50, tier="sonnet"), work_tiers=TIERS)
    assert spec.label_names == ["billing", "bug"]
    assert spec.definition()["labels"][1] == {"name": "bug", "description": "Broken things."}
    # The same content written in another order is the same task.
    reordered = dict(reversed(list(classify(max_tokens=50, tier="sonnet").items())))
    assert tasks.parse_task(reordered, work_tiers=TIERS).content_sha256() == spec.content_sha256()
    assert tasks.parse_task(classify(), work_tiers=TIERS).content_sha256() != spec.content_sha256()


def test_an_extract_task_checks_its_examples_against_its_schema() -> None:
    spec = tasks.parse_task(extract(), work_tiers=TIERS)
    assert spec.schema is not None and spec.examples[0].output == {"number": "INV-1"}


@pytest.mark.parametrize(("obj", "expected"), [
    (classify(labels=[{"name": "billing", "description": "Money."}, {"name": "billing", "description": "Again."}]),
     "label 2: label 'billing' is defined twice"),
    (classify(labels=[{"name": "billing"}]), "label 1: ('billing') missing required field 'description'"),
    (classify(labels=[{"description": "no name"}]), "label 1: missing required field 'name'"),
    (classify(labels=None), "a classify task needs 'labels'"),
    (classify(labels=[]), "field 'labels' must be a non-empty list"),
    (classify(examples=[{"input": "x", "output": "refund"}]),
     "example 1: output 'refund' is not one of the labels (billing, bug)"),
    (classify(examples=[{"input": "x"}]), "example 1: missing required field 'output'"),
    (classify(schema={"type": "object"}), "field 'schema' is only for an extract task"),
    (extract(schema={"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}),
     "field 'schema' has a reference"),
    (extract(schema={"type": "nonsense"}), "field 'schema' is not a valid JSON Schema"),
    (extract(schema={"type": "string", "pattern": "(a)\\1"}), "field 'schema'"),
    (extract(examples=[{"input": "x", "output": {"number": 7}}]),
     "example 1: output does not fit the schema at number: 7 is not of type 'string'"),
    (extract(labels=[{"name": "a", "description": "b"}]), "field 'labels' is only for a classify task"),
    (classify(kind="summarise"), "field 'kind' must be classify, extract, draft or generate"),
    (classify(name="has space"), "task name 'has space' must be"),
    (classify(instructions="  "), "field 'instructions' must not be empty"),
    (classify(tier="haiku"), "field 'tier' 'haiku' is not a work tier"),
    (classify(max_tokens=0), "field 'max_tokens' must be a whole number"),
    (classify(colour="blue"), "unknown field(s) 'colour' in the task"),
])
def test_every_bad_definition_is_one_sentence(obj: dict[str, Any], expected: str) -> None:
    assert expected in refusal(obj)


def test_bad_toml_is_one_sentence_with_its_line() -> None:
    with pytest.raises(JobInputError, match=r"not valid TOML: .*line 2"):
        tasks.read_toml('name = "x"\nkind = \n')


# -- versioning ------------------------------------------------------------------------------------


def _versions(db: Session, name: str, tenant_id: int | None = None) -> int:
    scope = Task.tenant_id.is_(None) if tenant_id is None else Task.tenant_id == tenant_id
    return db.scalar(select(func.count()).select_from(Task).where(scope, Task.name == name)) or 0


def test_apply_twice_is_a_no_op_and_a_changed_label_is_version_2(db: Session) -> None:
    first = tasks.apply(db, tasks.parse_task(classify(name="v-topic"), work_tiers=TIERS), tenant_id=None)
    again = tasks.apply(db, tasks.parse_task(classify(name="v-topic"), work_tiers=TIERS), tenant_id=None)
    assert (first.version, first.created) == (1, True)
    assert (again.version, again.created) == (1, False)
    assert _versions(db, "v-topic") == 1

    changed = classify(name="v-topic")
    changed["labels"] = copy.deepcopy(changed["labels"])
    changed["labels"][1]["description"] = "Anything that fails."
    second = tasks.apply(db, tasks.parse_task(changed, work_tiers=TIERS), tenant_id=None)
    assert (second.version, second.created) == (2, True)
    # Version 1 is kept as it was, and is still found by its number.
    v1 = tasks.get(db, "v-topic", tenant_id=None, version=1)
    assert v1.definition["labels"][1]["description"] == "Broken things."
    assert tasks.get(db, "v-topic", tenant_id=None).version == 2
    assert [(t.name, t.version) for t in tasks.get_all(db, tenant_id=None) if t.name == "v-topic"] == [("v-topic", 2)]


def test_tenants_see_only_their_own_tasks(db: Session) -> None:
    a = tenants.get_or_create(db, "tasks-tenant-a").id
    b = tenants.get_or_create(db, "tasks-tenant-b").id
    tasks.apply(db, tasks.parse_task(classify(name="shared-name"), work_tiers=TIERS), tenant_id=a)
    assert tasks.apply(db, tasks.parse_task(classify(name="shared-name"), work_tiers=TIERS), tenant_id=b).created
    assert [t.name for t in tasks.get_all(db, tenant_id=b)] == ["shared-name"]
    with pytest.raises(NotFound, match="no task named 'shared-name'"):
        tasks.get(db, "shared-name", tenant_id=None)
    with pytest.raises(NotFound, match="task 'shared-name' has no version 3"):
        tasks.get(db, "shared-name", tenant_id=a, version=3)


# -- the sample, the README, and the CLI -----------------------------------------------------------


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Tasks\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```toml\n(.*?)```", section, re.S)
    assert found, "the README's Tasks section has no TOML example"
    return found.group(1)


def test_the_readme_example_is_the_bundled_sample_and_applies(db: Session) -> None:
    text = _readme_example()
    assert text == SAMPLE.read_text()
    spec = tasks.parse_task(tasks.read_toml(text), work_tiers=TIERS)
    assert len(spec.labels) >= 3 and len(spec.examples) >= 3
    assert all(x.description for x in spec.labels)
    assert tasks.apply(db, spec, tenant_id=None).created


def test_the_readme_task_commands_work_as_written(database_url: str) -> None:
    section = (ROOT / "README.md").read_text().split("\n## Tasks\n", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```sh\n(.*?)```", section, re.S) for line in block.splitlines()]
    assert len(commands) == 3
    for command in commands:
        proc = subprocess.run(["bash", "-c", command.replace(".venv/bin/switchyard", SWITCHYARD)], cwd=ROOT,
                              env=cli_env(database_url), capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"


def _sy(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SWITCHYARD, *args], env=cli_env(database_url), capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_apply_list_show_and_refusals(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "cli-topic.toml"
    path.write_text(SAMPLE.read_text().replace('name = "ticket-topic"', 'name = "cli-topic"'))
    first = _sy(database_url, "tasks", "apply", str(path), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) | {"content_sha256": ""} == {"task": "cli-topic", "version": 1, "created": True,
                                                                 "content_sha256": ""}
    again = _sy(database_url, "tasks", "apply", str(path))
    assert again.returncode == 0 and "task cli-topic: unchanged, still version 1" in again.stdout

    path.write_text(path.read_text().replace("Anything else:", "Everything else:"))
    second = _sy(database_url, "tasks", "apply", str(path))
    assert second.returncode == 0 and "task cli-topic: new version 2" in second.stdout

    listed = json.loads(_sy(database_url, "tasks", "list", "--json").stdout)
    assert {"task": "cli-topic", "version": 2, "kind": "classify"}.items() <= next(
        t for t in listed if t["task"] == "cli-topic").items()
    shown = json.loads(_sy(database_url, "tasks", "show", "cli-topic", "--version", "1", "--json").stdout)
    assert shown["version"] == 1 and "Anything else:" in shown["definition"]["labels"][3]["description"]

    path.write_text(path.read_text().replace('output = "other"', 'output = "others"'))
    bad = _sy(database_url, "tasks", "apply", str(path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{path}: example 4: output 'others' is not one of the labels" in " ".join(bad.stderr.split())
    missing = _sy(database_url, "tasks", "show", "cli-topic", "--version", "9")
    assert missing.returncode == 2 and "task 'cli-topic' has no version 9" in missing.stderr


# -- jobs that name a task -------------------------------------------------------------------------


def _jsonl(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _bound(sessions: sessionmaker[Session], batch: str) -> dict[str, tuple[str, int, str, dict[str, Any]]]:
    with sessions() as s:
        rows = s.execute(select(Job.key, Task.name, Task.version, Job.kind, Job.payload)
                         .join(Batch, Batch.id == Job.batch_id).join(Task, Task.id == Job.task_id)
                         .where(Batch.name == batch)).all()
    return {r.key: (r.name, r.version, r.kind.value, r.payload) for r in rows}


def _apply(sessions: sessionmaker[Session], obj: dict[str, Any]) -> tasks.Applied:
    with transaction(sessions) as s:
        return tasks.apply(s, tasks.parse_task(obj, work_tiers=TIERS), tenant_id=None)


def test_a_job_is_bound_to_the_current_version_and_keeps_it(sessions: sessionmaker[Session], models: ModelConfig,
                                                            tmp_path: Path) -> None:
    _apply(sessions, classify(name="bind-topic"))
    first = _jsonl(tmp_path / "a.jsonl", [{"key": "t-1", "task": "bind-topic", "text": "charged twice"},
                                          {"key": "t-2", "task": "bind-topic", "kind": "classify", "text": "crash"}])
    report = enqueue_file(sessions, first, batch="bind-a", config=models)
    assert report.accepted == 2
    bound = _bound(sessions, "bind-a")
    assert {k: v[:3] for k, v in bound.items()} == {"t-1": ("bind-topic", 1, "classify"),
                                                   "t-2": ("bind-topic", 1, "classify")}
    # The labels the stages check come from the task version.
    assert bound["t-1"][3] == {"text": "charged twice", "labels": ["billing", "bug"]}
    # The same file again, the task unchanged, adds nothing.
    assert enqueue_file(sessions, first, batch="bind-a", config=models).accepted == 0

    _apply(sessions, classify(name="bind-topic", labels=[{"name": "billing", "description": "Money."},
                                                        {"name": "bug", "description": "Broken."},
                                                        {"name": "other", "description": "The rest."}]))
    enqueue_file(sessions, _jsonl(tmp_path / "b.jsonl", [{"key": "t-3", "task": "bind-topic", "text": "hello"},
                                                         {"key": "t-4", "task": "bind-topic", "task_version": 1,
                                                          "text": "hello"}]),
                 batch="bind-b", config=models)
    later = _bound(sessions, "bind-b")
    assert later["t-3"][1:3] == (2, "classify") and later["t-3"][3]["labels"] == ["billing", "bug", "other"]
    assert later["t-4"][1] == 1
    # The first file again, now that the task has changed, would bind its jobs to version 2: they
    # are different jobs under keys already used, so the file is refused, and the old jobs keep
    # version 1.
    with pytest.raises(JobInputError, match="key 't-1' was already used in this batch for a different job"):
        enqueue_file(sessions, first, batch="bind-a", config=models)
    assert {v[1] for v in _bound(sessions, "bind-a").values()} == {1}


def test_a_csv_file_names_tasks_in_its_task_columns(sessions: sessionmaker[Session], models: ModelConfig,
                                                    tmp_path: Path) -> None:
    _apply(sessions, classify(name="csv-topic"))
    _apply(sessions, classify(name="csv-topic", labels=[{"name": "billing", "description": "Money."},
                                                       {"name": "other", "description": "The rest."}]))
    path = tmp_path / "jobs.csv"
    # One file mixes jobs under a task (its current version, or a pinned one) with a plain job.
    path.write_text("key,kind,task,task_version,text,labels\n"
                    "c-1,,csv-topic,,charged twice,\n"
                    "c-2,,csv-topic,1,app crashes,\n"
                    "c-3,classify,,,hello,yes|no\n")
    assert enqueue_file(sessions, path, batch="csv-bound", config=models).accepted == 3
    bound = _bound(sessions, "csv-bound")
    assert {k: v[:2] for k, v in bound.items()} == {"c-1": ("csv-topic", 2), "c-2": ("csv-topic", 1)}
    assert bound["c-1"][3]["labels"] == ["billing", "other"]

    bad = tmp_path / "bad.csv"
    bad.write_text("key,task,task_version,text\nc-1,csv-topic,two,charged twice\n")
    with pytest.raises(JobInputError) as caught:
        enqueue_file(sessions, bad, batch="csv-refused", config=models)
    assert str(caught.value).startswith(f"{bad}, line 2: field 'task_version' must be a whole number from 1, "
                                        "not 'two'")


@pytest.mark.parametrize(("job", "expected"), [
    ({"task": "nosuch-task", "text": "x"}, "unknown task: no task named 'nosuch-task'"),
    ({"task": "refuse-topic", "task_version": 7, "text": "x"}, "unknown task: task 'refuse-topic' has no version 7"),
    ({"task": "refuse-topic", "kind": "extract", "text": "x"},
     "field 'kind' 'extract' does not fit task 'refuse-topic', a classify task: leave 'kind' out"),
    ({"task": "refuse-topic", "text": "x", "labels": ["a"]}, "field 'labels' cannot be given with 'task'"),
    ({"task": "refuse-topic", "prompt": "x"}, "unknown field(s) 'prompt' for a classify job"),
    ({"task": "refuse-topic"}, "missing required field 'text'"),
])
def test_a_bad_task_job_refuses_the_whole_file(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
                                               job: dict[str, Any], expected: str) -> None:
    _apply(sessions, classify(name="refuse-topic"))
    path = _jsonl(tmp_path / "bad.jsonl", [{"key": "ok", "task": "refuse-topic", "text": "fine"}, {"key": "b", **job}])
    with pytest.raises(JobInputError) as caught:
        enqueue_file(sessions, path, batch="refused", config=models)
    assert str(caught.value).startswith(f"{path}, line 2: {expected}")
    with sessions() as s:
        assert s.scalar(select(Batch.id).where(Batch.name == "refused")) is None


def test_task_names_are_looked_up_once_per_file(sessions: sessionmaker[Session], models: ModelConfig,
                                                tmp_path: Path) -> None:
    _apply(sessions, classify(name="once-topic"))
    opened: list[int] = []

    def counting() -> Session:
        opened.append(1)
        return sessions()

    named = tasks.lookup(counting, tenant_id=None)
    refs = {named("once-topic", None).id for _ in range(500)}
    assert len(refs) == 1 and len(opened) == 1
    for _ in range(3):
        with pytest.raises(JobInputError):
            named("missing-topic", None)
    assert len(opened) == 2


def test_jobs_show_names_the_task_and_version(sessions: sessionmaker[Session], models: ModelConfig,
                                              database_url: str, tmp_path: Path) -> None:
    _apply(sessions, classify(name="show-topic"))
    enqueue_file(sessions, _jsonl(tmp_path / "s.jsonl", [{"key": "s-1", "task": "show-topic", "text": "crash"}]),
                 batch="show-batch", config=models)
    shown = _sy(database_url, "jobs", "show", "s-1", "--batch", "show-batch", "--json")
    assert shown.returncode == 0, shown.stderr
    assert (json.loads(shown.stdout)["task"], json.loads(shown.stdout)["task_version"]) == ("show-topic", 1)
    table = _sy(database_url, "jobs", "show", "s-1", "--batch", "show-batch")
    assert "task show-topic  version 1" in table.stdout


def test_a_task_too_large_for_the_context_refuses_its_jobs(sessions: sessionmaker[Session], models: ModelConfig,
                                                           tmp_path: Path) -> None:
    _apply(sessions, classify(name="huge-topic", instructions="Read every word of it. " * 8_000))  # ~50k tokens
    # A text that fits the context alone (as a job without a task), but not beside the task.
    text = "x" * int((max_job_tokens(models) - 30_000) * CHARS_PER_TOKEN)
    alone = _jsonl(tmp_path / "alone.jsonl", [{"key": "h", "kind": "classify", "labels": ["a"], "text": text}])
    assert enqueue_file(sessions, alone, batch="huge-alone", config=models).accepted == 1
    path = _jsonl(tmp_path / "huge.jsonl", [{"key": "h", "task": "huge-topic", "text": text}])
    with pytest.raises(JobInputError, match="line 1: job is too large for the model's context"):
        enqueue_file(sessions, path, batch="huge", config=models)


def test_cli_tenant_tasks_are_the_tenants_own(database_url: str, sessions: sessionmaker[Session],
                                               tmp_path: Path) -> None:
    with transaction(sessions) as s:
        tenants.get_or_create(s, "cli-task-tenant")
    applied = _sy(database_url, "tasks", "apply", str(SAMPLE), "--tenant", "cli-task-tenant", "--json")
    assert applied.returncode == 0, applied.stderr
    mine = json.loads(_sy(database_url, "tasks", "list", "--tenant", "cli-task-tenant", "--json").stdout)
    assert [(t["task"], t["version"]) for t in mine] == [("ticket-topic", 1)]
    shown = _sy(database_url, "tasks", "show", "ticket-topic", "--tenant", "cli-task-tenant", "--json")
    assert json.loads(shown.stdout)["definition"]["name"] == "ticket-topic"
    unknown = _sy(database_url, "tasks", "list", "--tenant", "nobody-here")
    assert unknown.returncode == 2 and "no tenant called 'nobody-here'" in unknown.stderr
