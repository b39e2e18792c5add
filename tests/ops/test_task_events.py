"""Task events, for Flower and `celery events`: a worker started with --events sends them, one
started without does not (both send heartbeats, so a monitor lists them either way). Read with
Celery's own event receiver on the broker, as Flower reads them."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.fake_claude import FakeClaude
from pipeline.settings import Settings
from tests.cluster import Cluster
from workers.config import make_app

pytestmark = pytest.mark.e2e


def wait(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def events_of(prefix: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("hostname", "")).startswith(prefix)]


def test_only_a_worker_started_with_events_sends_task_events(fresh_database: Callable[[str], str],
                                                              broker_url: str, fake_claude: FakeClaude,
                                                              tmp_path: Path) -> None:
    database_url = fresh_database("events")
    app = make_app(Settings(DATABASE_URL=database_url, BROKER_URL=broker_url))
    seen: list[dict[str, Any]] = []
    cluster = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                      workdir=tmp_path)
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        listening = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True)
        listening.start()
        try:
            # Started side by side, then waited for: a worker takes seconds to start on a busy machine.
            loud = cluster.worker("triage", concurrency=1, extra=["--events"], wait=False)
            quiet = cluster.worker("validate", concurrency=1, wait=False)
            for proc in (loud, quiet):
                cluster.wait_ready([proc])
            wait("heartbeats", lambda: any(e["type"] == "worker-heartbeat" for e in events_of("triage@", seen))
                 and any(e["type"] == "worker-heartbeat" for e in events_of("validate@", seen)))
            # A job id that does not exist: each stage finds nothing to do, and the task succeeds.
            app.send_task("switchyard.triage", args=[0], queue="triage")
            app.send_task("switchyard.validate", args=[0], queue="validate")
            wait("task events from the --events worker",
                 lambda: "task-succeeded" in {e["type"] for e in events_of("triage@", seen)})
            wait("the quiet worker's task", lambda: re.search(r"switchyard\.validate\[.*\] succeeded",
                                                               quiet.log.read_text()) is not None)
            # A heartbeat sent after the task: anything the worker sent before it has arrived.
            after = len(seen)
            wait("a later heartbeat", lambda: any(e["type"] == "worker-heartbeat"
                                                  for e in events_of("validate@", seen[after:])))
        finally:
            receiver.should_stop = True
            cluster.stop()
            listening.join(10)
    loud_types = {e["type"] for e in events_of("triage@", seen)}
    assert {"task-received", "task-started", "task-succeeded"} <= loud_types, loud_types
    assert next(e for e in events_of("triage@", seen) if e["type"] == "task-received")["name"] == "switchyard.triage"
    assert not {t for t in (e["type"] for e in events_of("validate@", seen)) if t.startswith("task-")}


def test_the_environment_turns_task_events_on_for_every_worker() -> None:
    """What compose sets (SWITCHYARD_TASK_EVENTS) reaches the app a worker starts with."""
    assert make_app(Settings(SWITCHYARD_TASK_EVENTS="1")).conf.worker_send_task_events is True
    assert make_app(Settings()).conf.worker_send_task_events is False
