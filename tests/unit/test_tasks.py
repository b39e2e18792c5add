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
from sqlalchemy.orm import Session

from pipeline import tenants
from pipeline.errors import JobInputError, NotFound
from pipeline.intake import tasks
from pipeline.models import Task
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
