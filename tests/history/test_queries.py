"""jobs list (every filter, keyset paging), batches, cancel and export, through the real command
on the real Postgres. Rows come from the real enqueue; a factory then sets the fields a finished
pipeline would have (status, tier, created_at), so each filter has something to exclude."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.errors import InvalidQuery
from pipeline.flow.states import transition_many
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Batch, Job, JobEvent, JobKind, JobStatus, ModelCall, Stage
from pipeline.queries import history
from tests.history.helpers import job_line, switchyard, switchyard_json, write_jsonl

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
N = 120


def _shape(i: int) -> tuple[JobStatus, str | None]:
    """The status and tier the factory gives job i."""
    status = [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.QUEUED][i % 4]
    tier = None if status is JobStatus.QUEUED else ("opus" if i % 3 == 0 else "sonnet")
    return status, tier


def _cost(i: int) -> float:
    """What job i cost: a queued job has made no call."""
    return 0 if _shape(i)[0] is JobStatus.QUEUED else i / 1000


@pytest.fixture(scope="module")
def shaped(history_sessions: sessionmaker[Session], models: ModelConfig,
           tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two batches: 'hist-a' with N shaped jobs created an hour apart from T0, and 'hist-b'."""
    d = tmp_path_factory.mktemp("hist")
    enqueue_file(history_sessions, write_jsonl(d / "a.jsonl", (job_line(i) for i in range(N))), batch="hist-a",
                 config=models)
    enqueue_file(history_sessions, write_jsonl(d / "b.jsonl", (job_line(i) for i in range(30))), batch="hist-b",
                 config=models)
    with history_sessions() as s:
        jobs = s.scalars(select(Job).join(Batch).where(Batch.name == "hist-a").order_by(Job.id)).all()
        for i, job in enumerate(jobs):
            status, tier = _shape(i)
            s.execute(update(Job).where(Job.id == job.id).values(
                status=status, tier=tier, created_at=T0 + timedelta(hours=i), cost_usd=_cost(i)))
            if tier is not None:  # the call that cost it, as the stages record one
                s.add(ModelCall(job_id=job.id, stage=Stage.WORK, tier=tier, model=f"m-{tier}", outcome="ok",
                                cost_usd=_cost(i), latency_ms=100.0, started_at=T0 + timedelta(hours=i)))
        s.commit()
        return {"ids": [j.id for j in jobs], "keys": [j.key for j in jobs]}


def _all_pages(run, *args: str, limit: int) -> tuple[list[dict], int]:
    """Every job the filter selects, following the cursor; and how many pages it took."""
    jobs: list[dict] = []
    cursor: list[str] = []
    pages = 0
    while True:
        page = run("jobs", "list", *args, "--limit", str(limit), *cursor)
        pages += 1
        jobs += page["jobs"]
        if not page["next_cursor"]:
            return jobs, pages
        cursor = ["--cursor", page["next_cursor"]]


def _expected(shaped: dict, pred) -> list[int]:
    return sorted((shaped["ids"][i] for i in range(N) if pred(i)), reverse=True)


def test_cursor_pages_through_a_batch_newest_first_without_gaps(history_url: str, shaped: dict) -> None:
    # The real command as a subprocess, page after page.
    jobs, pages = _all_pages(lambda *a: switchyard_json(history_url, *a), "--batch", "hist-a", limit=25)
    assert [j["id"] for j in jobs] == sorted(shaped["ids"], reverse=True)
    assert pages == 5  # 120 jobs at 25 a page


@pytest.mark.parametrize(("args", "pred"), [
    (["--status", "failed"], lambda i: _shape(i)[0] is JobStatus.FAILED),
    (["--status", "failed", "--status", "queued"], lambda i: _shape(i)[0] in (JobStatus.FAILED, JobStatus.QUEUED)),
    (["--tier", "opus"], lambda i: _shape(i)[1] == "opus"),
    (["--kind", "draft"], lambda i: i % 4 == 2),
    (["--since", "2026-01-12T00:00:00Z"], lambda i: T0 + timedelta(hours=i) >= datetime(2026, 1, 12, tzinfo=UTC)),
    (["--until", "2026-01-11"], lambda i: T0 + timedelta(hours=i) < datetime(2026, 1, 11, tzinfo=UTC)),
    (["--since", "2026-01-11T00:00:00+00:00", "--until", "2026-01-11T06:00:00+00:00"],
     lambda i: 12 <= i < 18),
    (["--key-prefix", "job-000010"], lambda i: f"job-{i:07d}".startswith("job-000010")),
    (["--key-prefix", "job-00001", "--status", "succeeded", "--tier", "sonnet", "--kind", "generate"],
     lambda i: f"{i:07d}".startswith("00001") and _shape(i) == (JobStatus.SUCCEEDED, "sonnet") and i % 4 == 1),
])
def test_each_filter_selects_exactly_its_jobs(sy_json, shaped: dict, args: list[str], pred) -> None:
    jobs, _ = _all_pages(sy_json, "--batch", "hist-a", *args, limit=7)
    expected = _expected(shaped, pred)
    assert expected, "the filter must select something"
    assert len(expected) < N, "the filter must exclude something"
    assert [j["id"] for j in jobs] == expected


@pytest.mark.parametrize(("args", "pred"), [
    # Across batches, a window that ends in the past is read as the range of ids inside it.
    (["--tier", "opus", "--since", "2026-01-11T00:00:00Z", "--until", "2026-01-13T00:00:00Z"],
     lambda i: 12 <= i < 60 and _shape(i)[1] == "opus"),
    # Fewer jobs than a page: the walk stops at the window's first id, the result is the same.
    (["--tier", "sonnet", "--since", "2026-01-11T00:00:00Z", "--until", "2026-01-11T05:00:00Z"],
     lambda i: 12 <= i < 17 and _shape(i)[1] == "sonnet"),
    (["--since", "2026-01-11T00:00:00Z", "--until", "2026-01-12T00:00:00Z"], lambda i: 12 <= i < 36),
    (["--tier", "opus", "--until", "2026-01-11"], lambda i: i < 12 and _shape(i)[1] == "opus"),
])
def test_time_windows_across_batches(sy_json, shaped: dict, args: list[str], pred) -> None:
    jobs, _ = _all_pages(sy_json, *args, limit=7)
    expected = _expected(shaped, pred)
    assert expected, "the window must select something"
    assert [j["id"] for j in jobs] == expected


def test_window_bounds_hold_when_ids_and_created_at_disagree(db: Session) -> None:
    # Jobs whose created_at is not in id order (a clock step, rows written with an old time): the
    # window's id range is its smallest and largest id, so paging still finds every job in it.
    t0 = datetime(2001, 1, 1, tzinfo=UTC)
    batch = Batch(name="scrambled-window")
    db.add(batch)
    db.flush()
    hours = [5, 1, 9, 3, 0, 7, 2, 8, 6, 4]
    jobs = [Job(batch_id=batch.id, key=f"s{i}", kind=JobKind.CLASSIFY, payload={}, status=JobStatus.SUCCEEDED,
                tier="opus" if h % 2 else "sonnet", created_at=t0 + timedelta(hours=h)) for i, h in enumerate(hours)]
    db.add_all(jobs)
    db.flush()
    filters = history.JobFilters(tier="opus", since=t0 + timedelta(hours=2), until=t0 + timedelta(hours=8))
    got: list[int] = []
    cursor = None
    while True:
        page = history.list_jobs(db_session=db, filters=filters, limit=1, cursor=cursor)
        got += [j.id for j in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert got == sorted((j.id for j, h in zip(jobs, hours, strict=True) if h % 2 and 2 <= h < 8), reverse=True)
    assert len(got) == 3


def test_filters_across_batches_and_batch_filter(sy_json, sy, shaped: dict) -> None:
    everything, _ = _all_pages(sy_json, "--key-prefix", "job-000000", limit=1000)
    assert {j["batch"] for j in everything} >= {"hist-a", "hist-b"}
    only_b, _ = _all_pages(sy_json, "--batch", "hist-b", limit=1000)
    assert len(only_b) == 30
    assert {j["batch"] for j in only_b} == {"hist-b"}
    code, table, _ = sy("jobs", "list", "--batch", "hist-b", "--limit", "10")
    assert code == 0
    assert "job-0000029" in table
    assert "more: add --cursor" in table


def test_key_prefix_treats_like_wildcards_literally(db: Session) -> None:
    page = history.list_jobs(db_session=db, filters=history.JobFilters(key_prefix="job-%"))
    assert page.jobs == []
    page = history.list_jobs(db_session=db, filters=history.JobFilters(key_prefix="job_0"))
    assert page.jobs == []


def test_bad_queries_are_one_sentence(sy, history_url: str, shaped: dict) -> None:
    for args, words in [
        (["jobs", "list", "--status", "done"], "unknown status 'done'"),
        (["jobs", "list", "--since", "last tuesday"], "--since 'last tuesday' is not a time"),
        (["jobs", "list", "--cursor", "bm9wZQ"], "is not one that `jobs list` printed"),
        (["jobs", "list", "--limit", "0"], "limit must be between 1 and 1000"),
        (["jobs", "list", "--batch", "nope"], "no batch named 'nope'"),
        (["jobs", "show", "987654321"], "no job with id 987654321"),
        (["cancel", "nope"], "no batch named 'nope'"),
        (["export", "nope"], "no batch named 'nope'"),
    ]:
        code, out, err = sy(*args)
        assert code == 2, (args, out, err)
        assert words in " ".join(err.split()), (args, err)
    # And once as a real process: one line on stderr, no traceback.
    proc = switchyard(history_url, "jobs", "show", "987654321", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no job with id 987654321"


def test_parse_time_accepts_ages_and_iso() -> None:
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert history.parse_time("90m", now=now) == now - timedelta(minutes=90)
    assert history.parse_time("2d", now=now) == now - timedelta(days=2)
    assert history.parse_time("2026-04-30") == datetime(2026, 4, 30, tzinfo=UTC)
    with pytest.raises(InvalidQuery):
        history.parse_time("soon")


def test_batches_count_each_status_and_sum_cost(sy_json, sy, shaped: dict) -> None:
    rows = {b["name"]: b for b in sy_json("batches")}
    a = rows["hist-a"]
    assert a["jobs"] == N
    assert a["by_status"] == {"succeeded": 60, "failed": 30, "queued": 30}
    assert a["done"] == 90
    assert a["finished"] is False
    assert a["cost_usd"] == f"{sum(_cost(i) for i in range(N)):.8f}"
    assert rows["hist-b"]["by_status"] == {"queued": 30}
    code, table, _ = sy("batches")
    assert code == 0
    assert "hist-a" in table
    assert "hist-b" in table


def test_cancel_stops_only_jobs_not_started(history_url: str, history_sessions: sessionmaker[Session],
                                            models: ModelConfig, tmp_path: Path) -> None:
    enqueue_file(history_sessions, write_jsonl(tmp_path / "c.jsonl", (job_line(i) for i in range(50))),
                 batch="to-cancel", config=models)
    with history_sessions() as s:
        ids = s.scalars(select(Job.id).join(Batch).where(Batch.name == "to-cancel").order_by(Job.id)).all()
        # The dispatcher already took ten of them: those have started and must run on.
        transition_many(s, ids[:10], frm=JobStatus.QUEUED, to=JobStatus.TRIAGING, detail="dispatched to triage")
        s.commit()

    out = switchyard_json(history_url, "cancel", "to-cancel")
    assert out["cancelled"] == 40
    assert out["batch"] == "to-cancel"
    again = switchyard(history_url, "cancel", "to-cancel").stdout
    assert "cancelled 0 job(s)" in again

    with history_sessions() as s:
        jobs = s.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.id)).all()
        assert [j.status for j in jobs[:10]] == [JobStatus.TRIAGING] * 10
        assert [j.status for j in jobs[10:]] == [JobStatus.CANCELLED] * 40
        assert all(j.finished_at is not None for j in jobs[10:])
        events = s.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids[10:]),
                                                  JobEvent.to_status == JobStatus.CANCELLED)).all()
        assert len(events) == 40
        assert {e.from_status for e in events} == {JobStatus.QUEUED}
        batch = s.scalars(select(Batch).where(Batch.name == "to-cancel")).one()
        assert batch.cancelled_at is not None

    # A cancelled batch takes no new jobs.
    proc = switchyard(history_url, "enqueue", str(tmp_path / "c.jsonl"), "--batch", "to-cancel", ok=False)
    assert proc.returncode == 2
    assert "was cancelled" in proc.stderr


def test_export_round_trips_to_the_input_keys(history_url: str, shaped: dict, tmp_path: Path) -> None:
    lines = switchyard(history_url, "export", "hist-a").stdout.splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["key"] for r in rows] == shaped["keys"]
    assert set(rows[0]) == {"key", "status", "tier", "output", "error", "cost_usd"}
    assert [r["status"] for r in rows] == [_shape(i)[0].value for i in range(N)]

    out = tmp_path / "a.csv"
    switchyard(history_url, "export", "hist-a", "--format", "csv", "--out", str(out))
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["key"] for r in table] == shaped["keys"]
    assert [r["tier"] or None for r in table] == [_shape(i)[1] for i in range(N)]
