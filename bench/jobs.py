"""Job files for the benchmarks: the shape users send, written as JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path

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


def write_jsonl(path: Path, jobs: list[dict]) -> Path:
    with path.open("w") as fh:
        for j in jobs:
            fh.write(json.dumps(j) + "\n")
    return path
