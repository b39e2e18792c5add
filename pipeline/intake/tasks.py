"""Tasks: a named, versioned definition that a batch of jobs shares.

A task says once what every job of a batch would otherwise repeat: its kind, instructions, for
classify the labels with a description each, for extract the JSON Schema, worked examples (input →
expected output), and optionally the most tokens an answer may take and a pinned work tier. It is
written as TOML (or sent to the API as JSON), checked whole here, and stored as one row per version
in ``tasks``. Applying a definition whose content is unchanged adds nothing; a changed one adds the
next version, and the versions before it stay as they were.

Every check raises JobInputError with one sentence naming the field and the problem. Verbs take a
session and never commit; the caller owns the transaction.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.config import check_rate
from pipeline.errors import JobInputError, NotFound
from pipeline.flow import schema_check
from pipeline.flow.admission import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, valid_priority
from pipeline.intake.jobspec import TaskLookup, TaskRef, _check_storable, _check_strings, _json_tokens, digest
from pipeline.models import JobKind, Task
from pipeline.names import quoted

# A task's name: what a job's "task" field names, so kept short and plain.
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_INSTRUCTIONS_CHARS = 200_000
MAX_LABELS = 500
MAX_EXAMPLES = 200

_KINDS = {kind.value: kind for kind in JobKind}
_FIELDS = frozenset({"name", "kind", "instructions", "labels", "schema", "examples", "max_tokens", "tier",
                     "shadow_rate", "priority", "mode"})


@dataclass(frozen=True)
class Label:
    name: str
    description: str


@dataclass(frozen=True)
class Example:
    input: str
    output: Any


@dataclass(frozen=True)
class TaskSpec:
    """A checked definition. ``definition()`` is what is stored and hashed."""

    name: str
    kind: JobKind
    instructions: str
    labels: tuple[Label, ...] = ()
    schema: dict[str, Any] | None = None
    examples: tuple[Example, ...] = ()
    max_tokens: int | None = None
    tier: str | None = None
    # The share of the task's jobs shadowed (pipeline.flow.shadow), over the configuration's; a
    # batch's own rate is over this one.
    shadow_rate: float | None = None
    # The priority of a batch its jobs start (pipeline.flow.admission), unless the batch sets its own.
    priority: int | None = None
    # The default mode of the task's batches (standard or economy: pipeline.flow.economy); a batch's
    # own mode (enqueue --mode) is over it.
    mode: str | None = None

    def definition(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.value, "instructions": self.instructions}
        if self.kind is JobKind.CLASSIFY:
            out["labels"] = [{"name": x.name, "description": x.description} for x in self.labels]
        if self.schema is not None:
            out["schema"] = self.schema
        out["examples"] = [{"input": e.input, "output": e.output} for e in self.examples]
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.tier is not None:
            out["tier"] = self.tier
        if self.shadow_rate is not None:
            out["shadow_rate"] = self.shadow_rate
        if self.priority is not None:
            out["priority"] = self.priority
        if self.mode is not None:
            out["mode"] = self.mode
        return out

    def content_sha256(self) -> str:
        return digest(self.definition())

    @property
    def label_names(self) -> list[str]:
        return [x.name for x in self.labels]


@dataclass(frozen=True)
class Applied:
    name: str
    version: int
    created: bool  # False: the latest version already had this content, and nothing was added
    content_sha256: str


@dataclass(frozen=True)
class TaskVersion:
    id: int
    name: str
    version: int
    kind: str
    content_sha256: str
    created_at: datetime
    definition: dict[str, Any]


# -- checking a definition -------------------------------------------------------------------------


def _string(obj: dict[str, Any], name: str, *, where: str = "") -> str:
    value = obj.get(name)
    if value is None:
        raise JobInputError(f"{where}missing required field {name!r}")
    if not isinstance(value, str):
        raise JobInputError(f"{where}field {name!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise JobInputError(f"{where}field {name!r} must not be empty")
    return value


def check_task_name(name: Any) -> str:
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
        raise JobInputError(f"task name {quoted(name)} must be 1-100 letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit")
    return name


def _labels(raw: Any) -> tuple[Label, ...]:
    if raw is None:
        raise JobInputError("a classify task needs 'labels', each with a name and a description")
    if not isinstance(raw, list) or not raw:
        raise JobInputError("field 'labels' must be a non-empty list of {name, description} tables")
    if len(raw) > MAX_LABELS:
        raise JobInputError(f"field 'labels' has {len(raw):,} labels; at most {MAX_LABELS}")
    labels: list[Label] = []
    seen: set[str] = set()
    for i, item in enumerate(raw, 1):
        where = f"label {i}: "
        _check_table(item, ("name", "description"), where=where, shape="a name and a description")
        name = _string(item, "name", where=where)
        if name in seen:
            raise JobInputError(f"{where}label {quoted(name)} is defined twice")
        seen.add(name)
        labels.append(Label(name, _string(item, "description", where=f"{where}({quoted(name)}) ")))
    return tuple(labels)


def _check_table(item: Any, fields: tuple[str, str], *, where: str, shape: str) -> None:
    """A label or an example: a table of these fields and no other (a missing one is said where it
    is read)."""
    if not isinstance(item, dict):
        raise JobInputError(f"{where}must be a table with {shape}")
    unknown = item.keys() - set(fields)
    if unknown:
        raise JobInputError(f"{where}unknown field(s) {', '.join(quoted(u, 40) for u in sorted(unknown))}")


def _schema(raw: Any) -> dict[str, Any]:
    if raw is None:
        raise JobInputError("an extract task needs 'schema', a JSON Schema object")
    if not isinstance(raw, dict):
        raise JobInputError(f"field 'schema' must be a JSON object, not {type(raw).__name__}")
    # The same rule as an extract job's schema: valid, self-contained, patterns within RE2.
    problem = schema_check.problem(raw)
    if problem:
        raise JobInputError(f"field 'schema' {problem}")
    return raw


def _example_output(kind: JobKind, output: Any, *, labels: tuple[Label, ...], schema: dict[str, Any] | None,
                    where: str) -> Any:
    if kind is JobKind.CLASSIFY:
        names = [x.name for x in labels]
        if output not in names:
            raise JobInputError(f"{where}output {quoted(output)} is not one of the labels "
                                f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        return output
    if kind is JobKind.EXTRACT:
        assert schema is not None  # checked before the examples
        try:
            problems = schema_check.errors(schema, output)
        except schema_check.SchemaUnusable as exc:
            raise JobInputError(f"field 'schema' {exc}") from None
        if problems:
            first = problems[0]
            at = "/".join(str(p) for p in first.absolute_path) or "(root)"
            raise JobInputError(f"{where}output does not fit the schema at {at}: {first.message}")
        return output
    if not isinstance(output, str) or not output.strip():
        raise JobInputError(f"{where}output must be a non-empty string for a {kind.value} task")
    return output


def _examples(raw: Any, kind: JobKind, *, labels: tuple[Label, ...],
              schema: dict[str, Any] | None) -> tuple[Example, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise JobInputError("field 'examples' must be a list of {input, output} tables")
    if len(raw) > MAX_EXAMPLES:
        raise JobInputError(f"field 'examples' has {len(raw):,} examples; at most {MAX_EXAMPLES}")
    out: list[Example] = []
    for i, item in enumerate(raw, 1):
        where = f"example {i}: "
        _check_table(item, ("input", "output"), where=where, shape="an input and an output")
        text = _string(item, "input", where=where)
        if "output" not in item:
            raise JobInputError(f"{where}missing required field 'output'")
        out.append(Example(text, _example_output(kind, item["output"], labels=labels, schema=schema, where=where)))
    return tuple(out)


def parse_task(obj: Any, *, work_tiers: tuple[str, ...]) -> TaskSpec:
    """Check a decoded definition (from TOML or JSON) and return it normalised."""
    if not isinstance(obj, dict):
        raise JobInputError(f"a task must be a table (an object), not {type(obj).__name__}")
    _check_strings(obj)
    for field, value in obj.items():
        _check_storable(value, field, exact=True)
    unknown = obj.keys() - _FIELDS
    if unknown:
        raise JobInputError(f"unknown field(s) {', '.join(quoted(u, 40) for u in sorted(unknown))} in the task")
    if "name" not in obj:
        raise JobInputError("missing required field 'name'")
    name = check_task_name(obj["name"])
    kind_raw = obj.get("kind")
    kind = _KINDS.get(kind_raw) if isinstance(kind_raw, str) else None
    if kind is None:
        raise JobInputError(f"field 'kind' must be classify, extract, draft or generate, not {quoted(kind_raw)}")
    instructions = _string(obj, "instructions")
    if len(instructions) > MAX_INSTRUCTIONS_CHARS:
        raise JobInputError(f"field 'instructions' is longer than {MAX_INSTRUCTIONS_CHARS:,} characters")
    labels: tuple[Label, ...] = ()
    schema: dict[str, Any] | None = None
    if kind is JobKind.CLASSIFY:
        labels = _labels(obj.get("labels"))
    elif "labels" in obj:
        raise JobInputError(f"field 'labels' is only for a classify task, not a {kind.value} task")
    if kind is JobKind.EXTRACT:
        schema = _schema(obj.get("schema"))
    elif "schema" in obj:
        raise JobInputError(f"field 'schema' is only for an extract task, not a {kind.value} task")
    examples = _examples(obj.get("examples"), kind, labels=labels, schema=schema)
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= 128_000):
        raise JobInputError(f"field 'max_tokens' must be a whole number from 1 to 128000, not {quoted(max_tokens)}")
    tier = obj.get("tier")
    if tier is not None and tier not in work_tiers:
        raise JobInputError(f"field 'tier' {quoted(tier)} is not a work tier: expected one of {', '.join(work_tiers)}")
    shadow_rate = obj.get("shadow_rate")
    if shadow_rate is not None and check_rate(shadow_rate) is None:
        raise JobInputError(f"field 'shadow_rate' must be a number from 0 to 1 (the share of the task's jobs "
                            f"shadowed), not {quoted(shadow_rate)}")
    priority = obj.get("priority")
    if priority is not None and not valid_priority(priority):
        raise JobInputError(f"field 'priority' must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} (the "
                            f"priority of the batches the task's jobs start), not {quoted(priority)}")
    mode = obj.get("mode")
    if mode is not None and mode not in ("standard", "economy"):
        raise JobInputError(f"field 'mode' must be \"standard\" or \"economy\", not {quoted(mode)}")
    return TaskSpec(name=name, kind=kind, instructions=instructions, labels=labels, schema=schema,
                    examples=examples, max_tokens=max_tokens, tier=tier,
                    shadow_rate=check_rate(shadow_rate) if shadow_rate is not None else None, priority=priority,
                    mode=mode)


def read_toml(text: str | bytes) -> Any:
    """A task file's TOML, decoded; anything unreadable is one sentence with its line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise JobInputError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobInputError(f"not valid TOML: {exc}") from None


# -- storing and reading ---------------------------------------------------------------------------


def _scope(tenant_id: int | None) -> Any:
    return Task.tenant_id.is_(None) if tenant_id is None else Task.tenant_id == tenant_id


def latest(session: Session, name: str, *, tenant_id: int | None) -> Task | None:
    return session.scalars(select(Task).where(_scope(tenant_id), Task.name == name)
                           .order_by(Task.version.desc()).limit(1)).first()


def apply(session: Session, spec: TaskSpec, *, tenant_id: int | None) -> Applied:
    """Store ``spec`` as the task's first version, or as its next one when its content differs
    from the latest version's; otherwise add nothing."""
    sha = spec.content_sha256()
    current = latest(session, spec.name, tenant_id=tenant_id)
    if current is not None and current.content_sha256 == sha:
        return Applied(spec.name, current.version, created=False, content_sha256=sha)
    version = 1 if current is None else current.version + 1
    row = Task(tenant_id=tenant_id, name=spec.name, version=version, kind=spec.kind, content_sha256=sha,
               definition=spec.definition())
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        # Another apply of the same task took this version number first.
        raise JobInputError(f"task {quoted(spec.name)} was changed by someone else at the same moment: "
                            f"apply it again") from None
    return Applied(spec.name, version, created=True, content_sha256=sha)


def _version(row: Task) -> TaskVersion:
    return TaskVersion(id=row.id, name=row.name, version=row.version, kind=row.kind.value,
                       content_sha256=row.content_sha256, created_at=row.created_at, definition=row.definition)


def get_all(session: Session, *, tenant_id: int | None) -> list[TaskVersion]:
    """The latest version of each task, by name."""
    newest = (select(Task.name, func.max(Task.version).label("version")).where(_scope(tenant_id))
              .group_by(Task.name).subquery())
    rows = session.scalars(select(Task).join(newest, (Task.name == newest.c.name)
                                             & (Task.version == newest.c.version))
                           .where(_scope(tenant_id)).order_by(Task.name))
    return [_version(r) for r in rows]


def get(session: Session, name: str, *, tenant_id: int | None, version: int | None = None) -> TaskVersion:
    """One version of a task (the latest without ``version``), or NotFound in one sentence."""
    if version is None:
        row = latest(session, name, tenant_id=tenant_id)
        if row is None:
            raise NotFound(f"no task named {quoted(name)}")
        return _version(row)
    row = session.scalars(select(Task).where(_scope(tenant_id), Task.name == name, Task.version == version)).first()
    if row is None:
        if latest(session, name, tenant_id=tenant_id) is None:
            raise NotFound(f"no task named {quoted(name)}")
        raise NotFound(f"task {quoted(name)} has no version {version}")
    return _version(row)


def lookup(session_factory: Callable[[], Session], *, tenant_id: int | None) -> TaskLookup:
    """A TaskLookup for one input (a file, a request body): each task name and version is read from
    the database once, however many jobs name it, so a large file costs one query per task, not per
    line. An unknown name or version is JobInputError, one sentence; so are its repeats."""
    found: dict[tuple[str, int | None], TaskRef | str] = {}

    def find(name: str, version: int | None) -> TaskRef:
        ref = found.get((name, version))
        if ref is None:
            with session_factory() as session:
                try:
                    t = get(session, name, tenant_id=tenant_id, version=version)
                except NotFound as exc:
                    ref = f"unknown task: {exc}"
                else:
                    d = t.definition
                    ref = TaskRef(id=t.id, name=t.name, version=t.version, kind=JobKind(t.kind),
                                  labels=[x["name"] for x in d["labels"]] if "labels" in d else None,
                                  schema=d.get("schema"), tier=d.get("tier"), tokens=_json_tokens(d))
            found[(name, version)] = ref
        if isinstance(ref, str):
            raise JobInputError(ref)
        return ref

    return find


def default_priority(session: Session, task_ids: Collection[int]) -> int:
    """The priority of a new batch that sets none, from the task versions its jobs are bound to:
    the highest any of them sets, else the default."""
    if not task_ids:
        return DEFAULT_PRIORITY
    set_by = [d["priority"] for d in session.scalars(select(Task.definition).where(Task.id.in_(list(task_ids))))
              if d.get("priority") is not None]
    return max(set_by, default=DEFAULT_PRIORITY)
