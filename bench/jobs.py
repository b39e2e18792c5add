"""Job files for the benchmarks: the shape users send, written as JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = ["billing", "bug", "account", "other"]


def classify_jobs(n: int, *, tier: str | None = None, prefix: str = "job") -> list[dict]:
    """Classify jobs: validated by a deterministic label check, so each takes exactly three stages
    (triage, work, validate) and two model calls; or two stages and one call when ``tier`` pins them."""
    jobs = []
    for i in range(n):
        job: dict = {"key": f"{prefix}-{i}", "kind": "classify",
                     "text": f"Ticket {i}: I was charged twice for my plan this month.", "labels": LABELS}
        if tier:
            job["tier"] = tier
        jobs.append(job)
    return jobs


def job_of_kind(i: int, kind: str, hint: str, *, labels: list[str], schema: dict[str, Any]) -> dict[str, Any]:
    """Job ``i`` of one of the four kinds, its text ending with ``hint`` (the fake's steering
    hints): the mixed batches of the end-to-end tests and the economy benchmark."""
    job: dict[str, Any] = {"key": f"job-{i}", "kind": kind}
    if kind == "classify":
        job |= {"text": f"Ticket {i}: I was charged twice for my plan. {hint}", "labels": labels}
    elif kind == "extract":
        job |= {"text": f"Receipt {i} for Dana Smith, 42.50 paid. {hint}", "schema": schema}
    elif kind == "draft":
        job |= {"instructions": f"Reply to ticket {i} with an apology. {hint}", "context": "Order late by 3 days."}
    else:
        job |= {"prompt": f"Summarise item {i} in two lines. {hint}"}
    return job


def write_jsonl(path: Path, jobs: list[dict]) -> Path:
    with path.open("w") as fh:
        for j in jobs:
            fh.write(json.dumps(j) + "\n")
    return path
