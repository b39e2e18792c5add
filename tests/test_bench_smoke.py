"""The benchmarks are not tests (speed is measured by `make bench`), but their code must not rot:
run the two cheapest at a toy size and check that they measure something and report it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from bench import enqueue, history, report


@pytest.fixture
def console() -> Console:
    return Console(file=io.StringIO(), width=150)


def test_enqueue_benchmark_at_toy_size(console: Console) -> None:
    [fig] = enqueue.run(quick=True, console=console, jobs=300, rounds=2)
    assert fig.extra["jobs"] == 300 and len(fig.extra["switchyard_s_each"]) == 2
    assert fig.value > 0 and fig.baseline and fig.baseline > 0
    assert fig.ratio is not None and fig.passed is not None  # a verdict either way: speed is not asserted here


def test_history_benchmark_at_toy_size(console: Console) -> None:
    figures = history.run(quick=True, console=console, jobs=2_000, runs=3)
    names = [f.name for f in figures]
    assert len(figures) == 8, names
    for fig in figures[::2]:
        assert fig.extra["runs"] == 3 and fig.extra["p95_ms"] >= fig.extra["p50_ms"] > 0
        assert fig.extra["statements"] >= 1 and fig.extra["scans"], fig.extra
    # The job-story query reads each child table by its job_id index, whatever the size.
    story = next(f for f in figures if f.name.startswith("one job's full story") and "EXPLAIN" in f.name)
    assert "ix_model_calls_job_id" in story.note
    # Stats per tier is timed beside the floor of reading its rows, which did read them.
    stats = next(f for f in figures if f.name.startswith("stats per tier") and "EXPLAIN" not in f.name)
    assert stats.baseline and stats.baseline > 0 and stats.extra["floor_p95_ms"] == stats.baseline
    assert stats.ratio is not None
    assert "| history |" in report.markdown(figures)
