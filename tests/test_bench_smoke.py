"""The benchmarks are not tests (speed is measured by `make bench`), but their code must not rot:
run the cheapest at a toy size and check that they measure something and report it."""

from __future__ import annotations

import io
import threading
import time
from queue import Queue

import pytest
from rich.console import Console

from bench import caching, enqueue, history, quality, report, rollups, sdkcall


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


def test_rollups_benchmark_at_toy_size(console: Console) -> None:
    figures = rollups.run(quick=True, console=console, sizes=[100, 300], runs=4)
    by_name = {f.name.split(":")[0]: f for f in figures}
    # Each size timed, the ratio against the smallest, the raw reference, the overview's queries and
    # its whole page (signed in, through the app), the rebuild.
    assert len(figures) == 7, list(by_name)
    page = next(f for f in figures if f.name.startswith("overview page /ui/"))
    assert page.target == 50 and page.extra["runs"] == 4
    assert all(f.value > 0 for f in figures)
    ratio = next(f for f in figures if "against" in f.name)
    assert ratio.baseline and ratio.ratio is not None
    rebuild = figures[-1]
    assert rebuild.extra["jobs"] == 400 and rebuild.extra["calls"] > 400
    assert "| rollups |" in report.markdown(figures)


def test_caching_benchmark_at_toy_size(console: Console) -> None:
    figures = caching.run(quick=True, console=console, jobs=40, concurrency=4, latency_ms=100)
    by_tier = {f.name.split(" ", 1)[0]: f.extra for f in figures}
    assert list(by_tier) == ["haiku", "sonnet", "opus"], [f.name for f in figures]  # both work tiers got jobs
    for tier, extra in by_tier.items():
        assert extra["succeeded_on"] == extra["succeeded_off"] == 40, extra
        # The same calls both ways; with caching off nothing touches the cache (run() raises if it does).
        assert extra["calls_on"] == extra["calls_off"] > 0, (tier, extra)
        assert extra["cache_write_off"] == extra["cache_read_off"] == 0
        # On, the first calls write the ~5,000-token shared part and the later ones read it.
        assert extra["cache_write_on"] > 0 and extra["cache_read_on"] > 0, (tier, extra)
        # The same prompts both ways: caching changes how their tokens are billed, not how many.
        assert extra["input_off"] == extra["input_on"] + extra["cache_write_on"] + extra["cache_read_on"], extra
    hits = [f for f in figures if "hit rate" in f.name]
    costs = [f for f in figures if "input cost" in f.name]
    assert all(0 < f.value < 100 and f.passed is not None for f in hits)
    assert all(f.baseline and f.ratio is not None and 0 < f.ratio < 1 for f in costs)
    # Cost targets on the work tiers only; the triage tier's cost is reported without one.
    assert [f.passed is not None for f in costs] == [False, True, True]
    assert "| caching |" in report.markdown(figures)


def test_quality_benchmark_at_toy_size(console: Console) -> None:
    figures = quality.run(quick=True, console=console, jobs=60, concurrency=4, latency_ms=0)
    estimate, *costs, medium_opus, cascade = figures
    runs = estimate.extra["runs"]
    assert list(runs) == ["seed", "cascade", "medium=opus", "all-sonnet", "all-opus"]
    assert all(r["succeeded"] == 60 for r in runs.values()), runs
    # Opus's own run is the reference: it agrees with itself, and the pinned runs end where pinned.
    assert runs["all-opus"]["agreement"] == 1.0 and runs["all-opus"]["tiers"] == {"opus": 60}
    assert runs["all-sonnet"]["tiers"] == {"sonnet": 60} and runs["cascade"]["tiers"].get("haiku", 0) > 0
    assert runs["medium=opus"]["tiers"]["opus"] > runs["seed"]["tiers"]["opus"], runs
    # With the default error rates some answers are wrong (the draws are a hash of the job: fixed).
    assert all(0.5 < r["accuracy"] <= 1 for r in runs.values()), runs
    assert min(r["accuracy"] for r in runs.values()) < 1, runs
    # The estimator reports a verdict either way (at this size the interval is wide).
    assert estimate.passed is not None and estimate.extra["low"] <= estimate.extra["estimate"] <= estimate.extra["high"]
    assert [f.baseline_name for f in costs] == ["all-opus"] * 4 and all(f.ratio and f.ratio > 0 for f in costs)
    # whatif predicted both policies from the seed run, each against its own run.
    for fig, name in ((medium_opus, "medium=opus"), (cascade, "cascade")):
        assert name in fig.name and fig.passed is not None
        assert fig.extra["actual_cost_usd"] == runs[name]["cost_usd"] and fig.extra["predicted_cost_usd"] > 0
    assert "| quality |" in report.markdown(figures)


def test_sdk_call_benchmark_at_toy_size(console: Console) -> None:
    figures = sdkcall.run(quick=True, console=console, calls=30, rounds=1)
    ms = figures[0].extra["cpu_ms_per_call"]
    assert set(ms) == {"sdk", "orjson", "plain"} and all(v > 0 for v in ms.values()), ms
    assert figures[0].baseline == ms["sdk"] and figures[1].baseline == ms["plain"]


def test_in_flight_window_leaves_out_the_drain_of_a_variable_latency() -> None:
    """The in-flight benchmark's steady window: the middle half of the run with a fixed latency
    (the last call, started at 3 s, ends at 4 s with L = 1 s), and with a variable one the middle
    half of the run as it would be had the last call taken the median, not the drain after it."""
    from bench.inflight import Sampled

    fixed = Sampled(seconds=4.05, jobs=80, last_start=3.0, median_latency=1.0,
                    finished=[t + 0.01 for t in (1, 2, 3, 4) for _ in range(20)],
                    samples=[(t / 10, 20) for t in range(41)])
    assert fixed.window() == (1.0, 3.0)
    assert fixed.steady_rate() == pytest.approx(20.0)  # the waves ending at 1 and 2 s: 40 jobs in 2 s
    assert fixed.mean_in_flight() == 20.0
    # A drain of 60 s after the last start at 20 s: the window ends at 20 + 1, not at 80.
    drained = Sampled(seconds=80.0, jobs=400, last_start=20.0, median_latency=1.0,
                      finished=[i / 20 for i in range(400)],
                      samples=[(t / 10, 20 if t <= 210 else 1) for t in range(801)])
    assert drained.window() == (5.25, 15.75)
    assert drained.steady_rate() == pytest.approx(20.0, rel=0.01)
    assert drained.mean_in_flight() == 20.0
    # Without the fake's log (no last start), the run itself.
    assert Sampled(seconds=8.0, jobs=1).window() == (2.0, 6.0)


def test_in_flight_throughput_counts_whole_waves() -> None:
    """With a fixed latency the jobs finish in waves of C, and a time window counts whole waves:
    here waves one cycle (0.99 s) apart put three of them in the window [1, 3), which reads 30
    jobs/s for workers that sustain C / 0.99 = 20.2. Between ranks whole waves apart, the rate is
    the cycle's. A variable latency has no waves, and keeps the time window."""
    from bench.inflight import Sampled

    ends = [t for t in (1.0, 1.99, 2.98, 3.97) for _ in range(20)]
    waves = Sampled(seconds=4.05, jobs=80, last_start=3.0, median_latency=1.0, finished=ends)
    assert waves.window() == (1.0, 3.0)
    assert waves.steady_rate() == pytest.approx(30.0)
    assert waves.wave_rate(20) == pytest.approx(20 / 0.99)
    varied = Sampled(seconds=4.05, jobs=80, last_start=3.0, median_latency=1.0, finished=ends, fixed_latency=False)
    assert varied.wave_rate(20) == varied.steady_rate()


def _paced_log(rates: list[tuple[float, float]]) -> list[dict[str, object]]:
    """A fake's request log of answered sonnet requests: (seconds, requests per second) in turn."""
    log, t = [], 0.0
    for seconds, per_s in rates:
        end = t + seconds
        while t < end:
            log.append({"model": "claude-sonnet-5", "status": 200, "started_at": t, "output_tokens": 5})
            t += 1 / per_s
    return log


def test_rate_limit_steady_part_starts_where_the_first_burst_ends() -> None:
    """The rate-limit benchmark's steady part starts when the fake's bucket (10 requests a second,
    600 a window, begun full) is at its lowest. A client pacing itself at 0.97 of the limit after
    a first burst of 15 a second never empties it; it must still be measured at 0.97, not as never
    at the limit. A client that empties it and stays at the limit measures 1.0, and one that paces
    under the limit from the start measures its own rate."""
    from bench.ratelimit import SCENARIOS, Size, measure

    rpm, size = SCENARIOS[0], Size(window_s=60.0, steady_s=300.0)
    slow_burst = measure(_paced_log([(60.0, 15.0), (300.0, 9.7)]), rpm, size)
    assert slow_burst.share == pytest.approx(0.97, abs=0.01) and slow_burst.steady_s > 250
    at_limit = measure(_paced_log([(60.0, 25.0), (300.0, 10.0)]), rpm, size)
    assert at_limit.share == pytest.approx(1.0, abs=0.01)
    paced = measure(_paced_log([(360.0, 8.0)]), rpm, size)
    assert paced.share == pytest.approx(0.8, abs=0.01) and paced.steady_s > 350


def test_side_by_side_gives_each_call_a_broker_database_and_a_call_that_nests_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick size's benchmarks side by side each flush a Redis database of their own, taken at
    their first broker_url() and given back when they end. With one database, two calls that need
    one run one after the other; a call that only runs others side by side takes none, or nesting
    would wait on itself. The niceness of a call's processes is its own, else its caller's."""
    from bench import env

    free: Queue[int] = Queue()
    free.put(env.REDIS_DB)
    monkeypatch.setattr(env, "LANE_DBS", [env.REDIS_DB])
    monkeypatch.setattr(env, "_free_dbs", free)
    spans: dict[str, tuple[float, float]] = {}

    def needs_broker(name: str) -> tuple[str, int]:
        url = env.broker_url()
        t0 = time.monotonic()
        time.sleep(0.2)
        spans[name] = (t0, time.monotonic())
        return url, env._lane.nice

    def nests() -> dict[str, tuple[str, int]]:
        calls = {n: (lambda n=n: needs_broker(n)) for n in ("a", "b")}
        return {n: r for n, r, _ in env.side_by_side(calls, nice={"b": 3})}

    out: dict[str, dict[str, tuple[str, int]]] = {}
    runner = threading.Thread(daemon=True, target=lambda: out.update(
        {n: r for n, r, _ in env.side_by_side({"outer": nests}, nice={"outer": 7})}))
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "the nested calls waited for a database their caller held"
    url = f"{env.REDIS_SERVER}/{env.REDIS_DB}"
    assert out["outer"] == {"a": (url, 7), "b": (url, 3)}
    (_, first_end), (second_start, _) = sorted(spans.values())
    assert second_start >= first_end  # one database: the second waited until the first gave it back
    assert free.qsize() == 1 and not hasattr(env._lane, "lane")
