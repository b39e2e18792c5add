"""Which succeeded jobs are shadowed: a random draw against a rate, recorded with the job's
success (pipeline.flow.stages), so the sample is known before any shadow call is made and the
estimates over it are unbiased."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.models import JobKind, ShadowStatus


def effective_rate(*, configured: float, task: float | None = None, batch: float | None = None) -> float:
    """The batch's rate if it set one, else the task's, else the configuration's: the batch is the
    narrower choice, made when the work was sent."""
    if batch is not None:
        return batch
    if task is not None:
        return task
    return configured


def sampled_row(job_id: int, kind: JobKind, *, rate: float, draw: float, routed_tier: str, difficulty: str | None,
                reference_tier: str, judge_tier: str, now: datetime) -> dict[str, Any] | None:
    """The shadow_evaluations row of a job that just succeeded at ``routed_tier``, if ``draw`` (uniform
    in [0, 1)) falls under ``rate``; None if it is not sampled. A job that ended at the reference tier
    never is: its agreement with itself is 1."""
    if routed_tier == reference_tier or not draw < rate:
        return None
    judged = kind in (JobKind.DRAFT, JobKind.GENERATE)
    return {"job_id": job_id, "status": ShadowStatus.PENDING, "version": 0, "rate": rate, "draw": draw,
            "routed_tier": routed_tier, "difficulty": difficulty, "reference_tier": reference_tier,
            "judge_tier": judge_tier if judged else None, "deliveries": 0, "cost_usd": 0, "created_at": now,
            "updated_at": now}
