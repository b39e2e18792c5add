"""`switchyard demo`: the whole pipeline on bundled sample jobs, with nothing to set up.

With no DATABASE_URL and BROKER_URL it runs on SQLite and Celery's in-process broker, with
embedded workers for all four queues; with them set, the same code runs on Postgres and Redis.
With no ANTHROPIC_API_KEY the bundled fake Claude answers, and the demo says so. It runs whatever
routing policy SWITCHYARD_CONFIG names, and prints it: `make demo-cascade` runs the sample cascade
(pipeline/samples/cascade.toml), where easy jobs are worked by Haiku and one sample job climbs
Haiku -> Sonnet -> Opus.

Its batches run with shadow evaluation on (``DEMO_SHADOW_RATE`` of the jobs that succeed below the
reference tier are worked again by it), so each summary can set the estimated agreement with the
reference beside the cost saved. The bundled fake answers wrongly at its default error rates
(pipeline.fake_claude.rates), as models do, so that the agreement has something to measure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from celery.signals import task_failure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, select

from pipeline import migrate
from pipeline.cli.tables import compact
from pipeline.config import DIFFICULTIES, ModelConfig
from pipeline.errors import WaitTimedOut
from pipeline.flow.runtime import check_claude
from pipeline.flow.stages import Pipeline
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import OPEN_SHADOW, TERMINAL, Job, JobStatus, ShadowEvaluation
from pipeline.queries.history import batch_progress
from pipeline.queries.quality import Quality, quality
from pipeline.queries.report import Summary, summarize
from pipeline.settings import Settings, mask_url

if TYPE_CHECKING:
    from pipeline.flow.economy import Saving

# The demo's batches are small (51 and 12 jobs): half of the jobs below the reference shadowed gives
# the estimate a few dozen results, at the price of that many reference calls (the summary says what).
DEMO_SHADOW_RATE = 0.5


FAKE_KEY = "fake-key"  # the key the demo gives its own fake Claude


@dataclass
class DemoBatch:
    name: str
    summary: Summary
    quality: Quality
    economy: Saving  # its calls through message batches (none unless run with mode economy)


@contextmanager
def _fake_claude(settings: Settings, console: Console) -> Iterator[Settings]:
    if settings.api_key:
        console.print(f"Using the Claude API at {mask_url(settings.anthropic_base_url or 'api.anthropic.com')}.")
        # Once, before any job: a wrong key, URL or model is one sentence now, not 51 jobs that
        # wait out their patience and fail.
        check_claude(settings)
        yield settings
        return
    from pipeline.fake_claude import DEFAULT_ERROR_RATES, FakeClaude, FakeOptions

    options = FakeOptions(latency_ms=40, latency_jitter_ms=40, error_rates=DEFAULT_ERROR_RATES)
    with FakeClaude(options=options) as fake:
        console.print("[bold yellow]No ANTHROPIC_API_KEY: answers are simulated by the bundled fake Claude "
                      f"at {fake.base_url}, wrong at its default error rates.[/]")
        yield settings.model_copy(update={"anthropic_api_key": FAKE_KEY, "anthropic_base_url": fake.base_url})


def policy_line(models: ModelConfig) -> str:
    """The routing policy in one line, and where it was read from."""
    r = models.routing
    routes = ", ".join(f"{d} -> {r.by_difficulty[d]}" for d in DIFFICULTIES)
    return (f"Routing ({models.source}): {routes}, ambiguous -> {r.ambiguous}; "
            f"escalation {' -> '.join(r.escalation)}; work queues {', '.join(models.work_tiers)}.")


def sample_path(name: str = "demo.jsonl") -> Path:
    return Path(str(resources.files("pipeline").joinpath(f"samples/{name}")))


def _enqueue_task_sample(p: Pipeline, settings: Settings, batch: str, *, shadow_rate: float, mode: str) -> int:
    """The README's example task (pipeline/samples/ticket-topic.toml), applied as the operator's,
    and a few tickets that name it: the second batch of the default demo. Returns its batch id."""
    from pipeline.intake import tasks

    spec = tasks.parse_task(tasks.read_toml(sample_path("ticket-topic.toml").read_bytes()),
                            work_tiers=settings.models.work_tiers)
    with p.sessions() as session:
        tasks.apply(session, spec, tenant_id=None)
        session.commit()
    report = enqueue_file(p.sessions, sample_path("ticket-topic-jobs.jsonl"), batch=batch, config=settings.models,
                          shadow_rate=shadow_rate, mode=mode)
    assert report.batch_id is not None
    return report.batch_id


def run_demo(settings: Settings, *, console: Console, jobs_file: Path | None = None,
             shadow_rate: float = DEMO_SHADOW_RATE, timeout_s: float = 300.0, mode: str = "standard"
             ) -> list[DemoBatch]:
    """Run ``jobs_file`` (default: the bundled sample, then a second batch of task jobs) to its end,
    its shadows included, and return each batch's name, summary and quality figures. ``mode``
    economy: every call through the fake's message batches (the dispatcher's economy round)."""
    from pipeline.flow.dispatch import run_dispatcher
    from pipeline.flow.economy import build_economy, saving
    from pipeline.flow.runtime import build_pipeline
    from pipeline.queries.report import _job_filter
    from workers.base import install_pipeline, publisher
    from workers.config import queue_names
    from workers.embedded import embedded_worker

    with _fake_claude(settings, console) as settings:
        console.print(f"Database: {mask_url(settings.database_url)}   Broker: {mask_url(settings.broker_url)}")
        console.print(policy_line(settings.models), markup=False, highlight=False)
        migrate.upgrade(settings.database_url)
        p = build_pipeline(settings, concurrency=16)
        if mode == "economy" and settings.anthropic_api_key == FAKE_KEY:
            # The fake ends a message batch as soon as it is made: submit after a second and poll
            # twice a second, not the minute and ten seconds meant for the API's hours.
            p.models = replace(p.models, economy=replace(p.models.economy, max_age_s=1.0, poll_interval_s=0.5))
            console.print("Economy mode: every call through the fake's message batches, submitted after 1 s.")
        install_pipeline(p)
        import workers.celery

        # The tasks are registered on workers.celery.app, built from the environment; the demo's
        # settings (fake Claude URL) reach the tasks through the installed Pipeline, and the
        # broker URL is the app's own.
        app = workers.celery.app
        batch = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        report = enqueue_file(p.sessions, jobs_file or sample_path(), batch=batch, config=settings.models,
                              shadow_rate=shadow_rate, mode=mode)
        console.print(f"Enqueued {report.accepted} jobs into batch [bold]{batch}[/], shadow rate {shadow_rate:g} "
                      f"(reference tier {settings.models.routing.reference}).")
        assert report.batch_id is not None
        batches = [(batch, report.batch_id)]
        if jobs_file is None:
            batches.append((f"{batch}-tasks", _enqueue_task_sample(p, settings, f"{batch}-tasks",
                                                                   shadow_rate=shadow_rate, mode=mode)))
            console.print(f"Enqueued the tickets of task [bold]ticket-topic[/] into batch [bold]{batch}-tasks[/].")

        stop = threading.Event()
        dispatcher = threading.Thread(
            target=run_dispatcher, name="switchyard-dispatcher", daemon=True,
            args=(p, publisher(app)),
            kwargs=dict(max_in_flight=settings.max_in_flight, interval_s=0.2,
                        deadline_s=settings.effective_stage_deadline_s,
                        claim_deadline_s=settings.effective_claim_deadline_s, stop=stop,
                        # The economy round too, as `switchyard dispatcher` runs it (one read a
                        # tick while no call goes through a message batch).
                        economy=build_economy(p, settings).tick),
        )
        with embedded_worker(app, queues=queue_names(settings), concurrency=16), _StageFailures() as failures:
            dispatcher.start()
            try:
                for _, batch_id in batches:
                    _follow(p, batch_id, console, timeout_s=timeout_s, failures=failures)
            finally:
                stop.set()
                dispatcher.join(10)
        with p.sessions() as session:
            summaries = [DemoBatch(name, summarize(session, settings.models, batch_id=batch_id),
                                   quality(session, settings.models, batch_id=batch_id),
                                   saving(session, batch_multiplier=settings.models.batch_multiplier,
                                          job_filter=_job_filter(batch_id=batch_id)))
                         for name, batch_id in batches]
        install_pipeline(None)
        p.client.close()
        return summaries


def quality_line(batch: DemoBatch) -> str:
    """The saving beside what it cost in quality: the estimated agreement with the reference tier."""
    s, q = batch.summary, batch.quality
    saved = f"saved {s.saving_ratio:.0%} against all-{s.top_tier}"
    if q.agreement is None or q.agreement_low is None or q.agreement_high is None:
        why = "no job has succeeded" if q.succeeded == 0 else f"no shadowed job below {q.reference_tier} has a result"
        return f"{saved}; agreement with {q.reference_tier} not estimated: {why}"
    coverage = f", covering {q.coverage:.0%} of the jobs" if q.coverage is not None and q.coverage < 1 else ""
    return (f"{saved}; estimated agreement with {q.reference_tier} {q.agreement:.2f} "
            f"[{q.agreement_low:.2f}, {q.agreement_high:.2f}] from {q.evaluated} shadowed jobs{coverage} "
            f"(evaluation cost {compact(q.evaluation_cost_usd, 'usd')})")


class _StageFailures:
    """The first exception a stage task raised in the demo's embedded worker.

    A stage raises only on a bug: every failure a job can meet is recorded on the job. Deployed,
    such a stage is left to the sweeper, which republishes it after the stage deadline and fails
    the job as poison after SWITCHYARD_MAX_DELIVERIES starts, while the worker's log shows the
    traceback. The demo has nobody reading a log, and would sit out its whole timeout saying
    nothing; so it stops at the first one and shows it (``_follow``)."""

    def __init__(self) -> None:
        self.first: tuple[str, BaseException] | None = None

    def __enter__(self) -> _StageFailures:
        task_failure.connect(self._record, weak=False)
        return self

    def __exit__(self, *exc: object) -> None:
        task_failure.disconnect(self._record)

    def _record(self, sender: object = None, exception: BaseException | None = None, **_: object) -> None:
        if self.first is None and exception is not None:
            self.first = (getattr(sender, "name", "?"), exception)


def _follow(p: Pipeline, batch_id: int, console: Console, *, timeout_s: float,
            failures: _StageFailures | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with Progress(TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("jobs", total=None)
        while True:
            with p.sessions() as session:
                now = batch_progress(db_session=session, batch_id=batch_id)
            bar.update(task, completed=now.done, total=now.total)
            shadows = _open_shadows(p, batch_id) if now.total and now.done >= now.total else 0
            if now.total and now.done >= now.total and not shadows:
                return
            if failures is not None and failures.first is not None:
                stage, exc = failures.first
                # Not a SwitchyardError: a bug, whose traceback (chained below) the CLI keeps.
                raise RuntimeError(f"a stage raised in the demo's worker ({stage}), which is a bug in "
                                   f"switchyard; {now.done} of {now.total} jobs had ended") from exc
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{n} {s}" for s, n in now.by_status.items() if JobStatus(s) not in TERMINAL)
                waiting = waiting or f"{shadows} shadow evaluation(s) still open"
                raise WaitTimedOut(f"the demo batch did not finish within {timeout_s:.0f} s: {now.done} of "
                                   f"{now.total} jobs ended, and {waiting}; the log above may say why")
            time.sleep(0.2)


def _open_shadows(p: Pipeline, batch_id: int) -> int:
    """The batch's shadows still on their way: they run after their jobs, at the lowest priority."""
    with p.sessions() as session:
        return session.scalar(select(func.count()).select_from(ShadowEvaluation)
                              .join(Job, Job.id == ShadowEvaluation.job_id)
                              .where(Job.batch_id == batch_id, ShadowEvaluation.status.in_(OPEN_SHADOW))) or 0
