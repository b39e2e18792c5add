"""Every table the CLI prints fits an 80-column terminal without cutting a number.

The data is shaped like a real month: a 12,500-job batch with a long name, job ids in the tens of
millions, millions of tokens and thousands of dollars per tier. Each table is rendered at 80
columns (with ``--wide``, at 120; 160 for the calls of `jobs show`), and each figure must appear
whole, in its compact form, with no cell ended by "…". The figures are written out here by hand:
they are what a person reads."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.cli import common as cli
from pipeline.queries.history import BatchProgress
from pipeline.queries.ops import QueueStatus, Status, WorkerInfo
from pipeline.queries.report import FailureReason, Summary, TierLine
from pipeline.queries.shares import TenantShare

Run = Callable[..., tuple[int, str, str]]

BIG = "support-tickets-2026-q2-backfill-eu-west-1"
FIRST_ID = 41_000_000  # job ids as a busy deployment has them
# i -> status, for i in 0..12499: 11,873 succeeded, 312 failed, 200 queued, 110 in a stage, 5 cancelled
STATUS_SQL = """CASE WHEN i < 11873 THEN 'succeeded' WHEN i < 12185 THEN 'failed' WHEN i < 12385 THEN 'queued'
                     WHEN i < 12400 THEN 'triaging' WHEN i < 12465 THEN 'working' WHEN i < 12495 THEN 'validating'
                     ELSE 'cancelled' END"""


@pytest.fixture(scope="module")
def big(history_sessions: sessionmaker[Session]) -> None:
    """Per job: a Haiku triage call (93 in, 46 out, $0.0000323) and one work call, at Opus for
    every fifth job, a long document (180,000 in, 8,000 out, $0.88), and at Sonnet otherwise
    (1,250 in, 430 out, $0.0068), all at the default prices. One Sonnet job in eight fails
    validation and is escalated."""
    t0 = datetime(2026, 4, 30, 9, 15, tzinfo=UTC)
    with history_sessions() as s:
        s.execute(text("SELECT setval(pg_get_serial_sequence('jobs', 'id'), :v, false)"), {"v": FIRST_ID})
        big_id = s.execute(text("INSERT INTO batches (name, created_at) VALUES (:n, :t) RETURNING id"),
                           {"n": BIG, "t": t0}).scalar_one()
        s.execute(text(f"""
            INSERT INTO jobs (batch_id, key, kind, payload, status, tier, difficulty, cost_usd, created_at)
            SELECT :b, 'ticket-2026-04-30-' || lpad(i::text, 7, '0'), 'classify', '{{}}', {STATUS_SQL},
                   CASE WHEN i % 5 = 0 THEN 'opus' ELSE 'sonnet' END, 'easy',
                   CASE WHEN i % 5 = 0 THEN 0.8800323 ELSE 0.0068323 END, :t
            FROM generate_series(0, 12499) AS i ORDER BY i"""), {"b": big_id, "t": t0})
        s.execute(text("""
            INSERT INTO model_calls (job_id, stage, tier, model, attempt, delivery, outcome, applied, input_tokens,
                                     output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_usd,
                                     latency_ms, request_id, started_at)
            SELECT id, 'triage', 'haiku', 'claude-haiku-5-5', 1, 1, 'ok', true, 93, 46, 0, 0, 0.0000323,
                   400 + (id % 100) * 10, 'req_011CXtriage' || id, created_at FROM jobs WHERE batch_id = :b
            UNION ALL
            SELECT id, 'work', tier, 'claude-' || tier || '-5-5', 1, 1, 'ok', true,
                   CASE WHEN tier = 'opus' THEN 180000 ELSE 1250 END, CASE WHEN tier = 'opus' THEN 8000 ELSE 430 END,
                   0, 0, CASE WHEN tier = 'opus' THEN 0.88 ELSE 0.0068 END,
                   CASE WHEN tier = 'opus' THEN 9000 + (id % 100) * 300 ELSE 2000 + (id % 100) * 40 END,
                   'req_011CXwork' || id, created_at FROM jobs WHERE batch_id = :b"""), {"b": big_id})
        s.execute(text("""
            INSERT INTO validation_verdicts (job_id, tier, attempt, validator, ok, problems, created_at)
            SELECT id, tier, 1, 'label', NOT (tier = 'sonnet' AND id % 8 = 0), '[]', created_at
            FROM jobs WHERE batch_id = :b"""), {"b": big_id})
        s.execute(text("""
            INSERT INTO routing_decisions (job_id, reason_kind, from_tier, to_tier, created_at)
            SELECT id, 'escalation', 'sonnet', 'opus', created_at FROM jobs
            WHERE batch_id = :b AND tier = 'sonnet' AND id % 8 = 0"""), {"b": big_id})
        tiny = s.execute(text("INSERT INTO batches (name, created_at) VALUES ('tiny', :t) RETURNING id"),
                         {"t": t0}).scalar_one()
        s.execute(text("""
            INSERT INTO jobs (batch_id, key, kind, payload, status, tier, cost_usd, created_at)
            SELECT :b, 'tiny-' || i, 'generate', '{}', 'succeeded', 'sonnet', 0.00042, :t
            FROM generate_series(1, 3) AS i"""), {"b": tiny, "t": t0})
        s.execute(text("""
            INSERT INTO model_calls (job_id, stage, tier, model, attempt, delivery, outcome, applied, input_tokens,
                                     output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_usd,
                                     latency_ms, started_at)
            SELECT id, 'work', 'sonnet', 'claude-sonnet-5-5', 1, 1, 'ok', true, 120, 30, 0, 0, 0.00042, 850, created_at
            FROM jobs WHERE batch_id = :b"""), {"b": tiny})
        s.commit()


def fits(out: str, width: int, *figures: str, cut_text: bool = False) -> None:
    """Every line within ``width``, every figure whole; no "…" at all unless ``cut_text`` (a text
    column such as an error may end in one, a number never does)."""
    lines = out.splitlines()
    assert lines, "nothing printed"
    assert max(len(line) for line in lines) <= width, "\n" + out
    if not cut_text:
        assert "…" not in out, "\n" + out
    for figure in figures:
        assert figure in out, f"{figure!r} missing:\n{out}"


@pytest.fixture
def at80(sy: Run, monkeypatch: pytest.MonkeyPatch, big: None) -> Run:
    """`switchyard ARGS...` in this process, on an 80-column terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.console.width == 80

    def run(*args: str, columns: int = 80) -> tuple[int, str, str]:
        monkeypatch.setenv("COLUMNS", str(columns))
        code, out, err = sy(*args)
        assert code == 0, (args, out, err)
        return code, out, err

    return run


def test_batches_fit_80_columns(at80: Run) -> None:
    _, out, _ = at80("batches")
    # 12,500 jobs; 200 queued, 110 in a stage, 11,873 succeeded, 312 failed; $2,268.40.
    fits(out, 80, "12.5k", "200", "110", "11.9k", "312", "$2.27k", "$0.0013")
    _, out, _ = at80("batches", "--wide", columns=120)
    fits(out, 120, "12.5k", "11.9k", "2026-04-30 09:15:00", "$2.27k", "$0.0013")
    assert "cancelled" in out


def test_jobs_list_fits_80_columns(at80: Run) -> None:
    _, out, _ = at80("jobs", "list", "--batch", BIG, "--limit", "20")
    # Newest first: i = 12499 down to 12480; every fifth at Opus.
    fits(out, 80, *(str(FIRST_ID + i) for i in range(12480, 12500)), "$0.88", "$0.0068", "more: add --cursor")
    _, out, _ = at80("jobs", "list", "--batch", BIG, "--limit", "20", "--wide", columns=120)
    fits(out, 120, str(FIRST_ID + 12499), "$0.88", "$0.0068", "2026-04-30 09:15:00", "classify", cut_text=True)
    _, out, _ = at80("jobs", "list", "--limit", "20")  # every batch: the batch column too
    fits(out, 80, str(FIRST_ID + 12499), "$0.0068", "tiny-3", "$0.00042")


def test_jobs_show_fits_80_columns(at80: Run) -> None:
    _, out, _ = at80("jobs", "show", str(FIRST_ID))
    # Its triage call (93 in, 46 out, $0.0000323, 400 ms) and its Opus call (180,000 in, 8,000
    # out, $0.88, 9 s), and the job's cost.
    fits(out, 80, "93", "46", "$0.000032", "400 ms", "180k", "8,000", "$0.88", "9.00 s")
    # Every column of a call, the model and the request id among them, wants more than 120.
    _, out, _ = at80("jobs", "show", str(FIRST_ID), "--wide", columns=160)
    fits(out, 160, "claude-opus-5-5", f"req_011CXwork{FIRST_ID}", "180k", "$0.88", "9.00 s")


def test_stats_fit_80_columns(at80: Run, sy_json: Callable[..., Any]) -> None:
    _, out, _ = at80("stats")
    fits(out, 80,
         "12.5k",                                # calls at haiku; jobs
         "1.16M", "575k", "$0.40",               # haiku: 12,500 x (93 in, 46 out, $0.0000323)
         "12.5M", "4.30M", "$68.00",             # sonnet: 10,000 x (1,250 in, 430 out, $0.0068)
         "450M", "20.0M", "$2.20k",              # opus: 2,500 x (180,000 in, 8,000 out, $0.88)
         "25.0k", "464M", "24.9M", "$2.27k",     # all tiers
         "1,250", "12.5%",                       # sonnet jobs escalated, and their share
         "against $2.34k", "saved $67.60 (3%)")  # every job's final answer at Opus prices
    stats = sy_json("stats", "--batch", BIG)  # --json keeps every digit
    sonnet = next(t for t in stats["tiers"] if t["tier"] == "sonnet")
    assert (sonnet["input_tokens"], sonnet["cost_usd"], sonnet["escalations"]) == (12_500_000, "68.00000000", 1250)
    _, out, _ = at80("stats", "--wide")
    fits(out, 80, "1.16M", "12.5M", "$2.20k", "cache read tokens", "jobs worked")
    _, out, _ = at80("stats", "--batch", "tiny")
    fits(out, 80, "$0.0013")


def test_cache_figures_fit_80_columns() -> None:
    """The cache rows at their widest: every token read from the cache at one tier, none at another,
    and caching that cost more than it saved (writes never read back) at a third."""
    from pipeline.cli.history import _stats_table

    tiers = [TierLine("haiku", calls=12_500, input_tokens=1_162_500, cache_creation_input_tokens=51_200_000,
                      cost_usd=Decimal("12.80"), cache_saving_usd=Decimal("-1280.00")),
             TierLine("sonnet", calls=10_000, input_tokens=0, cache_read_input_tokens=999_999_999,
                      cost_usd=Decimal("200.00"), cache_saving_usd=Decimal("1799.999998")),
             TierLine("opus", calls=2_500, input_tokens=450_000_000, cost_usd=Decimal("2200.00"))]
    summary = Summary(jobs=12_500, by_status={"succeeded": 12_500}, tiers=tiers, escalations=0, validation_failures=0,
                      cost_usd=Decimal("2412.80"), top_tier="opus", top_tier_cost_usd=Decimal("2340.00"))
    for wide in (False, True):
        out = render(_stats_table(summary, title=Text("per tier"), wide=wide))
        fits(out, 80, "0.0%", "100.0%", "-$1.28k", "$1.80k", "$520.00", "66.6%")
        if wide:
            fits(out, 80, "51.2M", "1.00B")


def test_tokens_and_tenants_fit_80_columns(at80: Run) -> None:
    tenant = "acme-analytics-platform-europe-west"
    at80("tokens", "create", "--tenant", tenant)
    at80("tenants", "limits", tenant, "--jobs-in-flight", "250000", "--spend-per-day", "1500")
    _, out, _ = at80("tokens", "list")
    fits(out, 80, datetime.now(UTC).strftime("%Y-%m-%d"))
    _, out, _ = at80("tenants", "list")
    fits(out, 80, "250k", "$1.50k")


def render(renderable: Any, width: int = 80) -> str:
    console = Console(width=width, file=StringIO(), color_system=None)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_status_fits_80_columns() -> None:
    from pipeline.cli.status import render_status

    now = datetime.now(UTC).timestamp()
    queues = [QueueStatus(queue="triage", depth=1_234_567, reserved=128, in_flight=45_678, workers=4, concurrency=256,
                          busy=255, paused_s=12.5),
              QueueStatus(queue="validate", depth=0, reserved=0, in_flight=9_876, workers=2, concurrency=64, busy=3)]
    workers = [WorkerInfo(name="triage@worker-7f9c8d6b5-abcde.eu-west-1.compute.internal", tier="triage",
                          host="worker-7f9c8d6b5-abcde", pid=1_234_567, concurrency=64, pool="threads", busy=63,
                          started_at=now - 93_784, seen_at=now, metrics_port=9100)]
    limits = {"haiku": {"rpm": 4_000, "itpm": 4_000_000, "otpm": 800_000, "paused_s": 2.5}}
    tenants = [TenantShare(tenant="acme-analytics-platform-europe-west", weight=2.5, in_flight=45_678, share=0.824,
                           waiting=[9, 5, 5]), TenantShare(tenant="(operator)", weight=1, in_flight=9_876, share=0.176)]
    st = Status(queues=queues, workers=workers, in_flight={}, queued=3_456_789,
                finished_1m={"succeeded": 12_345, "failed": 67}, finished_5m={"succeeded": 61_234}, limits=limits,
                tenants=tenants)
    out = render(render_status(st))
    fits(out, 80, "1.23M", "128", "45.7k", "256", "255", "12.5 s", "9,876", "1234567", "1d 02h", ":9100",
         "4,000", "4.00M", "800k", "2.50 s", "3.46M", "12.3k", "61.2k", "82%", "18%", "2.5", "p9, p5 ×2")


def test_enqueue_wait_progress_fits_80_columns() -> None:
    from pipeline.cli.history import _progress_view

    by_tier = {"-": {"queued": 1_200_000, "triaging": 64}, "sonnet": {"working": 512, "succeeded": 700_000},
               "opus": {"validating": 32, "succeeded": 98_765, "failed": 1_234, "cancelled": 5}}
    by_status: dict[str, int] = {}
    for counts in by_tier.values():
        for status, n in counts.items():
            by_status[status] = by_status.get(status, 0) + n
    p = BatchProgress(batch_id=7, total=2_000_612, done=800_004, by_status=by_status, by_tier=by_tier,
                      cost_usd=Decimal("1234.5678"))
    reasons = [FailureReason(reason="validation failed at opus", jobs=1_200),
               FailureReason(reason="work call to opus: 400 invalid_request_error", jobs=30)]
    out = render(_progress_view(BIG, p, 3_723.0, reasons))
    # queued 1,200,000; running 64 + 512 + 32 = 608; succeeded 798,765; failed 1,234; cancelled 5
    fits(out, 80, "1.20M", "64", "512", "700k", "98.8k", "1,234", "608", "799k", "800k/2.00M", "$1.23k", "1h 02m",
         "validation failed at opus", "1,200", "for other reasons")


def test_demo_summary_fits_80_columns(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.console.width == 80
    tiers = [TierLine(tier="sonnet", jobs=9_000, calls=1_234_567, input_tokens=1_151_234_567, output_tokens=98_765_432,
                      cost_usd=Decimal("2345.678912")),
             TierLine(tier="opus", jobs=1_000, calls=2_345, input_tokens=3_456_789, output_tokens=456_789,
                      cost_usd=Decimal("0.184"))]
    summary = Summary(jobs=10_000, by_status={"succeeded": 10_000}, tiers=tiers, escalations=1_234,
                      validation_failures=2_345, cost_usd=Decimal("2345.862912"), top_tier="opus",
                      top_tier_cost_usd=Decimal("5678.9"))
    capsys.readouterr()
    cli.print_summary(summary)
    out = capsys.readouterr().out
    fits(out, 80, "9,000", "1.23M", "1.15B", "98.8M", "$2.35k", "1,000", "2,345", "3.46M", "457k", "$0.18")


def test_json_keeps_full_precision(sy_json: Callable[..., Any], big: None) -> None:
    rows = {b["name"]: b for b in sy_json("batches")}
    assert rows[BIG]["cost_usd"] == "2268.40375000"
    assert rows[BIG]["jobs"] == 12_500
    assert json.dumps(rows["tiny"]["cost_usd"]) == '"0.00126000"'


def test_readme_stats_example_is_the_table_stats_prints(at80: Run) -> None:
    """The README shows `stats` after a demo: the same rows, columns and closing lines as now."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = re.search(r"`switchyard stats` prints:\n\n  ```text\n(.*?)  ```", readme, flags=re.DOTALL)
    assert example is not None
    shown = [line.removeprefix("  ") for line in example.group(1).splitlines()]
    fits("\n".join(line for line in shown if line[0] in "┏┃┡│└"), 80)  # the lines under it are unwrapped

    def layout(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
        """Row labels, column headers, and the lines under the table with their figures blanked."""
        end = next(i for i, line in enumerate(lines) if line.startswith("└"))
        rows = [line.split("│")[1].strip() for line in lines[:end] if line.startswith("│")]
        header = next(line for line in lines if line.startswith("┃")).split()
        under = [re.sub(r"-?\$?\d[\d.,]*[kMBT%]?", "N", line) for line in lines[end + 1:]]
        return rows, header, under

    _, out, _ = at80("stats", columns=200)
    (rows, header, under), (rows_now, header_now, under_now) = layout(shown), layout(out.splitlines())
    assert (rows, header) == (rows_now, header_now)
    # This data set has failed jobs, which the demo has not: leave out the failure reasons' lines.
    under_now = [line for line in under_now if not line.startswith(("failed, the most common", "  "))]
    assert under[1:] == under_now[1:]  # under[0], the jobs per status, names other statuses here
