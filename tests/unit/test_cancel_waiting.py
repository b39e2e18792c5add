"""`cancel` reaches the jobs that are not being worked: the queued ones, and the ones waiting out
transient errors between tries. A job in a call right now is left to finish. `jobs show` says when
a waiting job is tried next."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, utcnow
from tests.cli import invoke


def test_cancel_takes_queued_and_waiting_jobs_and_leaves_running_ones(
        sessions: sessionmaker[Session], models: ModelConfig, database_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "waiting.jsonl"
    jobs.write_text("".join(json.dumps({"key": f"w-{i}", "kind": "generate", "prompt": f"job {i}"}) + "\n"
                            for i in range(5)))
    report = enqueue_file(sessions, jobs, batch="cancel-waiting", config=models)
    later, now = utcnow() + timedelta(minutes=5), utcnow()
    # How the stages leave them (pipeline.flow.states.release_stage; claim_stage): w-0 stays queued.
    states = {"w-1": dict(status=JobStatus.WORKING, tier="sonnet", not_before=later),     # waiting to retry
              "w-2": dict(status=JobStatus.TRIAGING, not_before=later),                  # waiting to retry
              "w-3": dict(status=JobStatus.WORKING, tier="sonnet", claimed_at=now),      # in a call
              "w-4": dict(status=JobStatus.VALIDATING, tier="sonnet", claimed_at=now, not_before=None)}
    with sessions() as s:
        for key, values in states.items():
            s.execute(update(Job).where(Job.batch_id == report.batch_id, Job.key == key).values(**values))
        s.commit()

    monkeypatch.setenv("DATABASE_URL", database_url)
    # `jobs show` says when a waiting job is tried next.
    code, out, err = invoke(monkeypatch, capsys, "jobs", "show", "w-1", "--batch", "cancel-waiting", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["next_try_at"].startswith(later.strftime("%Y-%m-%dT%H:%M:%S")) and shown["transient_since"] is None
    code, out, err = invoke(monkeypatch, capsys, "jobs", "show", "w-1", "--batch", "cancel-waiting")
    assert f"waiting out transient errors: next try {later:%Y-%m-%d %H:%M:%S}" in out
    code, out, err = invoke(monkeypatch, capsys, "jobs", "show", "w-3", "--batch", "cancel-waiting", "--json")
    assert json.loads(out)["next_try_at"] is None

    code, out, err = invoke(monkeypatch, capsys, "cancel", "cancel-waiting")
    assert code == 0, err
    assert " ".join(out.split()) == ("batch cancel-waiting: cancelled 3 job(s): 1 that had not started, "
                                     "2 waiting out transient errors")
    with sessions() as s:
        rows = {r.key: (r.status, r.error) for r in s.execute(
            select(Job.key, Job.status, Job.error).where(Job.batch_id == report.batch_id))}
    assert rows == {
        "w-0": (JobStatus.CANCELLED, "cancelled before it started"),
        "w-1": (JobStatus.CANCELLED, "cancelled in the working stage, while waiting out transient errors"),
        "w-2": (JobStatus.CANCELLED, "cancelled in the triaging stage, while waiting out transient errors"),
        "w-3": (JobStatus.WORKING, None),
        "w-4": (JobStatus.VALIDATING, None),
    }
    # Again: nothing left to cancel, and it says so.
    code, out, _ = invoke(monkeypatch, capsys, "cancel", "cancel-waiting", "--json")
    assert code == 0 and json.loads(out)["cancelled"] == 0
