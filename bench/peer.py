"""The overhead benchmark's peer: the Celery chain a competent team would write without switchyard.

Three tasks on three queues, with switchyard's worker settings (``bench.bare.same_worker_settings``)
and the same pool and concurrency: ``peer.triage`` asks Haiku for the difficulty, ``peer.work``
asks the tier that difficulty maps to for the answer, and ``peer.check`` judges it, deterministically
for a label or a schema and by a Haiku format check for a draft. The same official SDK, the same
prompts and structured outputs (``pipeline.flow.prompts``), against the same fake Claude. The job
travels in the messages, and each hop makes one ``UPDATE`` of the job's row, committed before the
next hop is published. No claims, no event log, no accounting, no retries beyond the SDK's own:
what it does not do is what switchyard adds. Workers run it with ``celery -A bench.peer worker -Q
peer_triage ...``, exactly as switchyard's workers run theirs.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import anthropic
from celery import Celery
from sqlalchemy import Engine, text

from bench.bare import comparison_app
from pipeline.config import ModelConfig
from pipeline.db import make_engine
from pipeline.flow.prompts import Prompt, format_check_prompt, triage_prompt, work_prompt
from pipeline.models import JobKind
from pipeline.settings import Settings

QUEUES = ("peer_triage", "peer_work", "peer_check")
TABLE = "bench_peer"

CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigint PRIMARY KEY,
    difficulty text,
    tier text,
    answer text,
    status text NOT NULL DEFAULT 'queued',
    output jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def make_peer_app(settings: Settings | None = None) -> Celery:
    return comparison_app("peer", QUEUES, settings)


app = make_peer_app()
app.set_default()

_lock = threading.Lock()
_engine: Engine | None = None
_client: anthropic.Anthropic | None = None
_models: ModelConfig | None = None


def _setup() -> tuple[Engine, anthropic.Anthropic, ModelConfig]:
    """One engine (sized as switchyard sizes its own) and one SDK client per worker process."""
    global _engine, _client, _models
    with _lock:
        if _engine is None or _client is None or _models is None:
            settings = Settings()
            c = int(os.environ.get("BARE_CONCURRENCY", "16"))
            _engine = make_engine(settings.database_url, pool_size=min(max(c // 4, 4), 16))
            _client = anthropic.Anthropic(api_key=settings.api_key, base_url=settings.anthropic_base_url)
            _models = settings.models
        return _engine, _client, _models


def _ask(tier: str, prompt: Prompt, max_tokens: int) -> str:
    """One Messages call as a team writes it: the SDK's parsed Message, its text blocks joined."""
    _, client, models = _setup()
    cfg = models.tier(tier)
    extra: dict[str, Any] = {}
    if cfg.structured_outputs and prompt.output_schema is not None:
        extra["output_config"] = {"format": {"type": "json_schema", "schema": prompt.output_schema}}
    message = client.messages.create(model=cfg.model, max_tokens=max_tokens, system=prompt.system,
                                     messages=[{"role": "user", "content": prompt.user}], **extra)
    return "".join(b.text for b in message.content if b.type == "text")


def _update(row_id: int, **values: Any) -> None:
    engine, _, _ = _setup()
    sets = ", ".join(f"{k} = :{k}" for k in values)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {TABLE} SET {sets}, updated_at = now() WHERE id = :id"), {"id": row_id, **values})


@app.task(name="peer.triage", ignore_result=True)
def triage(row_id: int, job: dict[str, Any]) -> None:
    _, _, models = _setup()
    kind = JobKind(job["kind"])
    try:
        verdict = json.loads(_ask(models.triage_tier, triage_prompt(kind, job), models.limits.triage_max_tokens))
        difficulty = verdict["difficulty"] if verdict.get("confidence", 0) >= models.routing.min_confidence \
            else "ambiguous"
    except (ValueError, KeyError, TypeError, AttributeError):
        difficulty = "ambiguous"
    tier = models.routing.by_difficulty.get(difficulty) or models.routing.ambiguous
    _update(row_id, difficulty=difficulty, tier=tier, status="working")
    app.send_task("peer.work", args=[row_id, job, tier], queue=QUEUES[1])


@app.task(name="peer.work", ignore_result=True)
def work(row_id: int, job: dict[str, Any], tier: str) -> None:
    _, _, models = _setup()
    answer = _ask(tier, work_prompt(JobKind(job["kind"]), job), models.limits.work_max_tokens)
    _update(row_id, answer=answer, status="checking")
    app.send_task("peer.check", args=[row_id, job, answer], queue=QUEUES[2])


def _judge(job: dict[str, Any], answer: str) -> Any:
    """The parsed output if the answer passes, else None."""
    kind = JobKind(job["kind"])
    if kind in (JobKind.CLASSIFY, JobKind.EXTRACT):
        try:
            data = json.loads(answer)
        except ValueError:
            return None
        if kind is JobKind.CLASSIFY:
            return data if isinstance(data, dict) and data.get("label") in job["labels"] else None
        import jsonschema  # only extract jobs need it

        return data if jsonschema.Draft202012Validator(job["schema"]).is_valid(data) else None
    _, _, models = _setup()
    reply = _ask(models.format_check_tier, format_check_prompt(kind, job, answer),
                 models.limits.format_check_max_tokens)
    try:
        ok = json.loads(reply).get("ok") is True
    except (ValueError, AttributeError):
        ok = False
    return {"text": answer} if ok else None


@app.task(name="peer.check", ignore_result=True)
def check(row_id: int, job: dict[str, Any], answer: str) -> None:
    output = _judge(job, answer)
    _update(row_id, status="succeeded" if output is not None else "failed",
            output=json.dumps(output) if output is not None else None)
