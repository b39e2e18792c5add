"""Celery settings for long, I/O-bound model calls on a threads pool with Redis as the broker; the
reason for each is beside it."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipeline.flow.admission import BROKER_PRIORITY_STEPS
from pipeline.settings import Settings

TASKS = {"triage": "switchyard.triage", "work": "switchyard.work", "validate": "switchyard.validate",
         "shadow": "switchyard.shadow"}


def queue_names(settings: Settings) -> list[str]:
    return settings.models.queues


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("switchyard", broker=settings.broker_url,
                 include=["workers.triage", "workers.work", "workers.validate", "workers.shadow"])
    app.conf.update(
        # Set here as well as in the constructor: an embedded worker's producer pool reads the
        # configuration, and without it publishes to Celery's default broker (amqp://localhost).
        broker_url=settings.broker_url,
        task_serializer="json",
        accept_content=["json"],
        # Results live in Postgres. A result backend would be a second, weaker source of truth.
        task_ignore_result=True,
        result_backend=None,
        # Ack after the task body ends, not when it starts: a worker that dies mid-call leaves its
        # message to be delivered again instead of losing the job.
        task_acks_late=True,
        # ...and with a prefork pool, requeue it when the child process is killed. A job that kills
        # its worker every time is caught by the delivery count on the job (pipeline.flow.states).
        task_reject_on_worker_lost=True,
        # Calls take 1-60 s. Prefetching would park messages behind a busy thread while other
        # workers sit idle; fetch one at a time, and only when a slot is free (Celery >= 5.6, Redis
        # only: the in-process broker of the demo does not support it).
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=settings.broker_url.startswith(("redis://", "rediss://")),
        # Redis redelivers any message not acked within the visibility timeout, even while the first
        # worker still runs it. It must exceed the longest a stage can take, retries included;
        # faster recovery after a crash comes from the sweeper, not from this.
        broker_transport_options={
            "visibility_timeout": int(settings.effective_stage_deadline_s + 600),
            # A list per priority level, each of the ten its own (kombu's default folds them into
            # four): a batch's priority orders its messages in every queue (pipeline.flow.admission).
            "priority_steps": list(BROKER_PRIORITY_STEPS),
        },
        task_queues=[Queue(name) for name in queue_names(settings)],
        task_default_queue="triage",
        task_create_missing_queues=True,
        # On SIGTERM, give running calls time to finish; what is still running after that is handed
        # back to the broker rather than abandoned until the visibility timeout.
        worker_soft_shutdown_timeout=min(settings.call_timeout_s, 60.0),
        worker_enable_soft_shutdown_on_idle=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Task events (received, started, succeeded, failed) are what Flower and `celery events`
        # show per task; nothing in switchyard reads them (`switchyard status` reads heartbeat keys
        # in Redis and Postgres). Each is a publish to the broker, three per stage: about 3.5 ms
        # more worker CPU per job (bench/events.py), so they are off unless asked for:
        # SWITCHYARD_TASK_EVENTS=1, or `switchyard worker --events`. Workers still send heartbeat
        # events, so Flower lists them either way.
        worker_send_task_events=settings.task_events,
    )
    if settings.broker_url.startswith("memory://"):
        # The in-process broker polls its queues; at the default interval a consumer that is busy
        # sees new messages only about once a second.
        app.conf.broker_transport_options = {"polling_interval": 0.01}
    app.conf.switchyard_settings = settings
    return app
