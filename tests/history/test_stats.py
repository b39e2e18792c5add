"""report.summarize on rows a factory builds: repeated and abandoned calls are counted, and on
random batches every figure equals the same figure worked out row by row in Python. On Postgres
the summary comes from the rollups and the rows not folded yet (pipeline.queries.rollups), checked
before and after a fold; its latency percentiles are the histogram's. On SQLite they are exact
(percentile_cont's arithmetic, in Python)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pipeline import migrate
from pipeline.claude.pricing import Usage, call_cost
from pipeline.config import ModelConfig
from pipeline.db import make_engine
from pipeline.models import Batch, Job, JobKind, JobStatus, ModelCall, RoutingDecision, Stage, ValidationVerdict
from pipeline.queries import rollups
from pipeline.queries.report import FailureReason, Summary, TierLine, failure_reasons, percentile, summarize

LATENCIES = [120.0, 80.0, 300.0, 95.0, 410.0, 150.0, 99.0]


def build(session: Session, *, interleaved: bool = False) -> tuple[int, int]:
    """Two batches; the first has a job whose work stage was delivered twice (a repeated call and
    an abandoned one) and an escalation. Returns the batch ids. ``interleaved`` gives the second
    batch's job an id between the first batch's two, as concurrent enqueues do: the first batch's
    id range then holds a job that is not its own."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    a, b = Batch(name="stats-a", created_at=t0), Batch(name="stats-b", created_at=t0)
    session.add_all([a, b])
    session.flush()
    j1 = Job(batch_id=a.id, key="j1", kind=JobKind.CLASSIFY, payload={}, status=JobStatus.SUCCEEDED, tier="opus",
             escalations=1, created_at=t0)
    j2 = Job(batch_id=a.id, key="j2", kind=JobKind.GENERATE, payload={}, status=JobStatus.FAILED, tier="sonnet",
             created_at=t0 + timedelta(days=2))
    j3 = Job(batch_id=b.id, key="j3", kind=JobKind.GENERATE, payload={}, status=JobStatus.SUCCEEDED, tier="sonnet",
             created_at=t0)
    for job in [j1, j3, j2] if interleaved else [j1, j2, j3]:
        session.add(job)
        session.flush()

    def call(job: Job, tier: str, ms: float | None, *, stage: Stage = Stage.WORK, delivery: int = 1,
             outcome: str = "ok", cost: str = "0.01", tokens: tuple[int, int] = (100, 10)) -> ModelCall:
        return ModelCall(job_id=job.id, stage=stage, tier=tier, model=f"m-{tier}", attempt=1, delivery=delivery,
                         outcome=outcome, input_tokens=tokens[0], output_tokens=tokens[1],
                         cache_creation_input_tokens=0, cache_read_input_tokens=0, cost_usd=Decimal(cost),
                         latency_ms=ms, started_at=t0)

    session.add_all([
        call(j1, "haiku", LATENCIES[0], stage=Stage.TRIAGE, cost="0.001"),
        call(j1, "sonnet", None, delivery=1, outcome="abandoned", cost="0"),
        call(j1, "sonnet", LATENCIES[1], delivery=2),
        call(j1, "sonnet", LATENCIES[2]),
        call(j1, "opus", LATENCIES[3], cost="0.05", tokens=(700, 70)),
        call(j2, "haiku", LATENCIES[4], stage=Stage.TRIAGE, cost="0.001"),
        call(j2, "sonnet", LATENCIES[5], outcome="error", cost="0"),
        call(j3, "sonnet", LATENCIES[6]),
        RoutingDecision(job_id=j1.id, reason_kind="escalation", from_tier="sonnet", to_tier="opus", created_at=t0),
        ValidationVerdict(job_id=j1.id, tier="sonnet", attempt=1, validator="label", ok=False, problems=["x"],
                          created_at=t0),
        ValidationVerdict(job_id=j1.id, tier="opus", attempt=1, validator="label", ok=True, problems=[],
                          created_at=t0),
    ])
    session.flush()
    return a.id, b.id


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'stats.sqlite'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def histogram_percentile(values: list[float], q: float) -> float | None:
    return rollups.percentile(rollups.histogram(values), q)


def _check(session: Session, models: ModelConfig, *, interleaved: bool) -> None:
    pct = histogram_percentile if session.get_bind().dialect.name == "postgresql" else percentile
    a, _b = build(session, interleaved=interleaved)
    s = summarize(session, models, batch_id=a)
    tiers = {t.tier: t for t in s.tiers}
    assert s.jobs == 2
    assert s.by_status == {"succeeded": 1, "failed": 1}
    sonnet = tiers["sonnet"]
    assert (sonnet.calls, sonnet.repeated_calls, sonnet.abandoned_calls, sonnet.failed_calls) == (4, 1, 1, 1)
    assert sonnet.repeated_cost_usd == Decimal("0.01")
    assert sonnet.worked == 2
    assert sonnet.escalations == 1
    assert sonnet.escalation_rate == pytest.approx(0.5)
    assert (sonnet.validations, sonnet.validation_failures, sonnet.validation_failure_rate) == (1, 1, 1.0)
    assert tiers["opus"].validation_failure_rate == 0.0
    sonnet_ms = [LATENCIES[1], LATENCIES[2], LATENCIES[5]]
    assert sonnet.p50_latency_ms == pytest.approx(pct(sonnet_ms, 0.5))
    assert sonnet.p50_latency_ms == pytest.approx(150.0, rel=rollups.BUCKET_ERROR)
    assert sonnet.p95_latency_ms == pytest.approx(pct(sonnet_ms, 0.95))
    assert tiers["haiku"].p50_latency_ms == pytest.approx(pct([LATENCIES[0], LATENCIES[4]], 0.5))
    assert s.cost_usd == Decimal("0.072")
    assert s.escalations == 1
    # The top-tier comparison prices each job's last successful work call: j1's opus call (j2's
    # only work call failed), not its earlier sonnet ones.
    top = models.tier(models.top_tier)
    assert s.top_tier_cost_usd == (700 * top.input_per_mtok + 70 * top.output_per_mtok) / 1_000_000
    # A time window (the shared test database holds other tests' jobs, all created in real time):
    # only j2 was created two days after the others.
    late = summarize(session, models, since=datetime(2026, 3, 2, tzinfo=UTC), until=datetime(2026, 3, 9, tzinfo=UTC))
    assert late.jobs == 1
    assert sum(t.calls for t in late.tiers) == 2
    march = summarize(session, models, since=datetime(2026, 3, 1, tzinfo=UTC), until=datetime(2026, 4, 1, tzinfo=UTC))
    assert march.jobs == 3


@pytest.mark.parametrize("interleaved", [False, True], ids=["batch-alone-in-its-ids", "ids-interleaved"])
def test_summary_on_postgres(db: Session, models: ModelConfig, interleaved: bool) -> None:
    _check(db, models, interleaved=interleaved)


@pytest.mark.parametrize("interleaved", [False, True], ids=["batch-alone-in-its-ids", "ids-interleaved"])
def test_summary_on_sqlite_computes_percentiles_in_python(sqlite_engine: Engine, models: ModelConfig,
                                                          interleaved: bool) -> None:
    with Session(sqlite_engine) as session:
        _check(session, models, interleaved=interleaved)


def _check_cache(session: Session, models: ModelConfig) -> None:
    """Calls that carry cache tokens, as a task's batch makes them: its first call writes the shared
    prefix, the others read it."""
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    batch = Batch(name="cached", created_at=t0)
    session.add(batch)
    session.flush()
    jobs = [Job(batch_id=batch.id, key=f"c{i}", kind=JobKind.CLASSIFY, payload={}, status=JobStatus.SUCCEEDED,
                tier="sonnet", created_at=t0) for i in range(3)]
    session.add_all(jobs)
    session.flush()

    def call(job: Job, tier: str, tokens: tuple[int, int, int, int], *, stage: Stage = Stage.WORK) -> ModelCall:
        inp, out, written, read = tokens
        cost = call_cost(models.tier(tier), Usage(inp, out, written, read), config=models)
        return ModelCall(job_id=job.id, stage=stage, tier=tier, model=f"m-{tier}", attempt=1, delivery=1,
                         outcome="ok", input_tokens=inp, output_tokens=out, cache_creation_input_tokens=written,
                         cache_read_input_tokens=read, cost_usd=cost, latency_ms=100.0, started_at=t0)

    session.add_all([
        # Sonnet ($2 per million in): one write of 5,000 tokens, two reads of them, 200 uncached each.
        call(jobs[0], "sonnet", (200, 10, 5000, 0)),
        call(jobs[1], "sonnet", (200, 10, 0, 5000)),
        call(jobs[2], "sonnet", (200, 10, 0, 5000)),
        # Haiku triage ($0.10 per million in): a prefix too short to cache, no cache tokens.
        *[call(j, "haiku", (300, 20, 0, 0), stage=Stage.TRIAGE) for j in jobs],
    ])
    session.flush()
    s = summarize(session, models, batch_id=batch.id)
    tiers = {t.tier: t for t in s.tiers}
    sonnet, haiku = tiers["sonnet"], tiers["haiku"]
    assert (sonnet.cache_creation_input_tokens, sonnet.cache_read_input_tokens, sonnet.input_tokens) == (
        5000, 10_000, 600)
    # The share of all input read from the cache: 10,000 of 15,600.
    assert sonnet.cache_hit_rate == pytest.approx(10_000 / 15_600)
    assert haiku.cache_hit_rate == 0.0
    assert tiers["opus"].cache_hit_rate is None  # no input at all
    # Uncached, the 15,000 cache tokens would have cost $2 per million; they cost 5,000 x 1.25 +
    # 10,000 x 0.1 of that: saved (15,000 - 6,250 - 1,000) x $2 / 1M = $0.0155.
    assert sonnet.cache_saving_usd == Decimal("0.0155")
    assert haiku.cache_saving_usd == 0
    assert s.cache_saving_usd == Decimal("0.0155")
    assert s.cache_hit_rate == pytest.approx(10_000 / (15_600 + 900))
    d = s.to_dict()
    line = next(t for t in d["tiers"] if t["tier"] == "sonnet")
    assert (line["cache_read_input_tokens"], line["cache_creation_input_tokens"]) == (10_000, 5000)
    assert line["cache_hit_rate"] == pytest.approx(10_000 / 15_600)
    assert Decimal(line["cache_saving_usd"]) == Decimal("0.0155")
    assert Decimal(d["cache_saving_usd"]) == Decimal("0.0155")
    assert d["cache_hit_rate"] == pytest.approx(10_000 / 16_500)
    # The top-tier comparison prices each job's final answer at Opus: its cache tokens too, as the
    # same cache writes and reads at Opus's prices.
    opus = models.tier("opus")
    assert s.top_tier_cost_usd == call_cost(opus, Usage(600, 30, 5000, 10_000), config=models)


def test_cache_figures_on_postgres(db: Session, models: ModelConfig) -> None:
    _check_cache(db, models)


def test_cache_figures_on_sqlite(sqlite_engine: Engine, models: ModelConfig) -> None:
    with Session(sqlite_engine) as session:
        _check_cache(session, models)


def test_percentile_interpolates_like_percentile_cont() -> None:
    assert percentile([], 0.5) is None
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile(list(map(float, range(1, 101))), 0.95) == pytest.approx(95.05)


def build_mixed(session: Session, seed: int) -> list[int]:
    """Three batches with every kind of row summarize reads, drawn at random: triage, work and
    format-check calls at known tiers and one the configuration lacks, failed, abandoned and
    unfinished calls, repeated deliveries, several work calls per job (escalations, retries),
    latencies that repeat or are missing (for a whole tier, too), escalations with and without a
    tier to come from, and verdicts. The first two batches' jobs take turns in id order (each
    batch's id range holds the other's jobs); the third is alone in its ids. Returns the batch ids."""
    rng = random.Random(seed)
    t0 = datetime(2026, 5, 1, tzinfo=UTC)
    batches = [Batch(name=f"mixed-{seed}-{i}", created_at=t0) for i in range(3)]
    session.add_all(batches)
    session.flush()
    owners = [batches[i % 2] for i in range(40)] + [batches[2]] * 30
    jobs = []
    for i, batch in enumerate(owners):
        job = Job(batch_id=batch.id, key=f"m{i}", kind=JobKind.CLASSIFY, payload={},
                  status=rng.choice(list(JobStatus)), tier=rng.choice([None, "sonnet", "opus", "legacy"]),
                  escalations=rng.choice([0, 0, 1, 2]), created_at=t0)
        session.add(job)
        session.flush()  # ids in this order
        jobs.append(job)
    for job in jobs:
        for _ in range(rng.randrange(6)):
            stage = rng.choice([Stage.TRIAGE, Stage.WORK, Stage.WORK, Stage.FORMAT_CHECK])
            tier = "haiku" if stage != Stage.WORK else rng.choice(["sonnet", "opus", "legacy"])
            outcome = rng.choice(["ok", "ok", "ok", "error", "abandoned", "started"])
            # "legacy" never reports a latency; elsewhere a few repeat, some are missing.
            ms = None if tier == "legacy" or rng.random() < 0.15 else rng.choice(
                [250.0, round(rng.uniform(40, 4000), 3)])
            session.add(ModelCall(
                job_id=job.id, stage=stage, tier=tier, model=f"m-{tier}", attempt=rng.randint(1, 3),
                delivery=rng.choice([1, 1, 1, 2, 3]), outcome=outcome, input_tokens=rng.randrange(5000),
                output_tokens=rng.randrange(900), cache_creation_input_tokens=rng.randrange(300),
                cache_read_input_tokens=rng.randrange(300), cost_usd=Decimal(rng.randrange(100_000)) / 10**6,
                latency_ms=ms, started_at=t0))
        for _ in range(rng.randrange(3)):
            session.add(RoutingDecision(job_id=job.id, reason_kind=rng.choice(["escalation", "triage", "retry"]),
                                        from_tier=rng.choice([None, "sonnet", "opus"]), to_tier="opus",
                                        created_at=t0))
        for _ in range(rng.randrange(3)):
            session.add(ValidationVerdict(job_id=job.id, tier=rng.choice(["sonnet", "opus", "legacy"]), attempt=1,
                                          validator="label", ok=rng.random() < 0.7, problems=[], created_at=t0))
    session.flush()
    return [b.id for b in batches]


def cache_saving(models: ModelConfig, c: ModelCall) -> Decimal:
    """A call's cost had every cache token been billed as plain input, less its cost."""
    tier = models.tier(c.tier)
    uncached = call_cost(tier, Usage(c.input_tokens + c.cache_creation_input_tokens + c.cache_read_input_tokens,
                                     c.output_tokens), config=models)
    return uncached - call_cost(tier, Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens,
                                            c.cache_read_input_tokens), config=models)


def by_hand(session: Session, models: ModelConfig, batch_id: int) -> Summary:
    """What summarize promises for a batch, worked out row by row in Python (the percentiles as
    this database's summarize computes them)."""
    pct = histogram_percentile if session.get_bind().dialect.name == "postgresql" else percentile
    jobs = session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
    mine = {j.id for j in jobs}
    calls = [c for c in session.scalars(select(ModelCall)).all() if c.job_id in mine]
    decisions = [d for d in session.scalars(select(RoutingDecision)).all() if d.job_id in mine]
    verdicts = [v for v in session.scalars(select(ValidationVerdict)).all() if v.job_id in mine]
    tiers = {name: TierLine(name) for name in models.tiers}

    def line(tier: str) -> TierLine:
        return tiers.setdefault(tier, TierLine(tier))

    for j in jobs:
        if j.tier is not None:
            line(j.tier).jobs += 1
    for tier in {c.tier for c in calls}:
        these = [c for c in calls if c.tier == tier]
        repeated = [c for c in these if c.delivery > 1]
        ms = [c.latency_ms for c in these if c.latency_ms is not None]
        t = line(tier)
        t.calls, t.input_tokens, t.output_tokens = len(these), sum(c.input_tokens for c in these), \
            sum(c.output_tokens for c in these)
        t.cost_usd = sum((c.cost_usd for c in these), Decimal(0))
        t.cache_creation_input_tokens = sum(c.cache_creation_input_tokens for c in these)
        t.cache_read_input_tokens = sum(c.cache_read_input_tokens for c in these)
        # What caching saved, call by call: each cache token's price as plain input, less its price.
        t.cache_saving_usd = (sum((cache_saving(models, c) for c in these), Decimal(0)) if tier in models.tiers
                              else None if t.cache_creation_input_tokens or t.cache_read_input_tokens else Decimal(0))
        t.failed_calls = sum(c.outcome == "error" for c in these)
        t.abandoned_calls = sum(c.outcome == "abandoned" for c in these)
        t.repeated_calls, t.repeated_cost_usd = len(repeated), sum((c.cost_usd for c in repeated), Decimal(0))
        t.p50_latency_ms, t.p95_latency_ms = pct(ms, 0.5), pct(ms, 0.95)
        t.worked = len({c.job_id for c in these if c.stage == Stage.WORK})
    for d in decisions:
        if d.reason_kind == "escalation":
            line(d.from_tier or "-").escalations += 1
    for v in verdicts:
        line(v.tier).validations += 1
        line(v.tier).validation_failures += not v.ok
    last_work: dict[int, ModelCall] = {}
    for c in sorted(calls, key=lambda c: c.id):
        if c.stage == Stage.WORK and c.outcome == "ok":
            last_work[c.job_id] = c
    top = models.tier(models.top_tier)
    top_cost = sum((call_cost(top, Usage(c.input_tokens, c.output_tokens, c.cache_creation_input_tokens,
                                         c.cache_read_input_tokens), config=models)
                    for c in last_work.values()), Decimal(0))
    by_status: dict[str, int] = {}
    for j in jobs:
        by_status[j.status.value] = by_status.get(j.status.value, 0) + 1
    return Summary(jobs=len(jobs), by_status=by_status, tiers=list(tiers.values()),
                   escalations=sum(j.escalations for j in jobs),
                   validation_failures=sum(t.validation_failures for t in tiers.values()),
                   cost_usd=sum((t.cost_usd for t in tiers.values()), Decimal(0)), top_tier=models.top_tier,
                   top_tier_cost_usd=top_cost)


def _check_by_hand(session: Session, models: ModelConfig, *, fold: bool = False) -> None:
    for seed in range(3):
        batch_ids = build_mixed(session, seed)
        # On Postgres: first all from the rows not folded, then with the ended jobs and finished
        # calls folded into the rollups (in this test's transaction) and the rest read raw.
        for folded in (False, True) if fold else (False,):
            if folded:
                assert rollups.fold(session, chunk=1_000_000).calls
            for batch_id in batch_ids:
                got, want = summarize(session, models, batch_id=batch_id), by_hand(session, models, batch_id)
                # Every figure exactly, the percentiles too: percentile() is percentile_cont's
                # arithmetic, and on Postgres the histogram's is worked out from the same latencies.
                assert {t.tier: t for t in got.tiers} == {t.tier: t for t in want.tiers}, (seed, batch_id, folded)
                assert (got.jobs, got.by_status, got.escalations, got.validation_failures, got.cost_usd) == (
                    want.jobs, want.by_status, want.escalations, want.validation_failures, want.cost_usd)
                assert got.top_tier_cost_usd == want.top_tier_cost_usd, (seed, batch_id, folded)


def test_summary_is_the_rows_worked_out_by_hand_on_postgres(db: Session, models: ModelConfig) -> None:
    _check_by_hand(db, models, fold=True)


def test_summary_is_the_rows_worked_out_by_hand_on_sqlite(sqlite_engine: Engine, models: ModelConfig) -> None:
    with Session(sqlite_engine) as session:
        _check_by_hand(session, models)


def _check_failure_reasons(session: Session, models: ModelConfig) -> None:
    t0 = datetime(2026, 5, 1, tzinfo=UTC)
    a, other = Batch(name="reasons-a", created_at=t0), Batch(name="reasons-b", created_at=t0)
    session.add_all([a, other])
    session.flush()

    def failed(batch: Batch, key: str, reason: str | None, error: str) -> Job:
        return Job(batch_id=batch.id, key=key, kind=JobKind.GENERATE, payload={}, status=JobStatus.FAILED,
                   failure_reason=reason, error=error, created_at=t0)

    refused = "work call to sonnet: 400 invalid_request_error"
    session.add_all([
        # Three jobs failed the same way, each with its own detail in its error.
        *[failed(a, f"bad-{i}", refused, f"work call to sonnet failed (permanent error): 400 ... job {i}")
          for i in range(3)],
        failed(a, "escalated", "validation failed at opus", "validation failed at opus after 2 attempt(s): x"),
        # Failed before failure_reason existed: its error is its reason.
        failed(a, "old", None, "an older failure"),
        Job(batch_id=a.id, key="fine", kind=JobKind.GENERATE, payload={}, status=JobStatus.SUCCEEDED, created_at=t0),
        # Another batch's failures are not this batch's.
        *[failed(other, f"x-{i}", "poison job (working stage)", "poison job: ...") for i in range(5)],
    ])
    session.flush()

    reasons = failure_reasons(session, batch_id=a.id)
    assert reasons == [FailureReason(refused, 3), FailureReason("an older failure", 1),
                       FailureReason("validation failed at opus", 1)]
    assert failure_reasons(session, batch_id=a.id, limit=1) == [FailureReason(refused, 3)]
    assert failure_reasons(session, batch_id=other.id) == [FailureReason("poison job (working stage)", 5)]
    window = failure_reasons(session, since=t0, until=t0 + timedelta(days=1))
    assert window[0] == FailureReason("poison job (working stage)", 5) and window[1] == FailureReason(refused, 3)
    summary = summarize(session, models, batch_id=a.id)
    assert summary.failure_reasons == reasons
    assert summary.to_dict()["failure_reasons"][0] == {"reason": refused, "jobs": 3}
    assert summarize(session, models, batch_id=a.id + 1000).failure_reasons == []


def test_failure_reasons_most_common_first_on_postgres(db: Session, models: ModelConfig) -> None:
    _check_failure_reasons(db, models)


def test_failure_reasons_most_common_first_on_sqlite(sqlite_engine: Engine, models: ModelConfig) -> None:
    with Session(sqlite_engine) as session:
        _check_failure_reasons(session, models)


def test_the_demo_summary_shows_the_failure_reasons(models: ModelConfig, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.common import print_summary

    summary = Summary(jobs=9, by_status={"succeeded": 2, "failed": 7}, tiers=[], escalations=0, validation_failures=0,
                      cost_usd=Decimal(0), top_tier="opus", top_tier_cost_usd=Decimal(0),
                      failure_reasons=[FailureReason("triage call to haiku: connection_error [x]", 5),
                                       FailureReason("validation failed at opus", 1)])
    print_summary(summary)
    out = capsys.readouterr().out
    assert ("failed, the most common reasons first:\n"
            "        5  triage call to haiku: connection_error [x]\n"
            "        1  validation failed at opus\n"
            "        1  for other reasons (`switchyard jobs list --status failed`)\n") in out
