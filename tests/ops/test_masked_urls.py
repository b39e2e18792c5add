"""No command prints or logs a password from DATABASE_URL, BROKER_URL or ANTHROPIC_BASE_URL: each
shows the URL with its password masked. The local Postgres trusts every connection and the local
Redis has no password, so URLs that carry one still work."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from pipeline.fake_claude import FakeClaude
from tests.cluster import SWITCHYARD, Cluster

PASSWORD = "pw-DO-NOT-PRINT-41c9"


def with_password(url: str, user: str = "") -> str:
    parts = urlsplit(url)
    netloc = f"{user or parts.username or ''}:{PASSWORD}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="module")
def urls(fresh_database: Callable[[str], str], broker_url: str, fake_claude: FakeClaude) -> dict[str, str]:
    # A database of its own: the dispatcher below would feed whatever other tests left queued. The
    # fake Claude answers the worker's start-up check (a URL with a password is tested apart: the
    # SDK then sends Basic credentials instead of the key, which the fake refuses).
    return {"DATABASE_URL": with_password(fresh_database("masked")), "BROKER_URL": with_password(broker_url),
            "ANTHROPIC_BASE_URL": fake_claude.base_url}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SWITCHYARD_"))}
    return subprocess.run([SWITCHYARD, *args], env={**base, "ANTHROPIC_API_KEY": "test-key", **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_status_works_with_passwords_and_prints_none(urls: dict[str, str]) -> None:
    out = run(urls, "status")
    assert out.returncode == 0, out.stderr
    assert "Queues" in out.stdout
    assert PASSWORD not in out.stdout + out.stderr


def test_status_names_a_wrong_broker_without_its_password(urls: dict[str, str]) -> None:
    out = run({**urls, "BROKER_URL": f"amqp://guest:{PASSWORD}@rabbit.example//"}, "status")
    assert out.returncode == 2
    assert PASSWORD not in out.stdout + out.stderr
    assert "BROKER_URL is 'amqp://guest:***@rabbit.example//'" in out.stderr


def test_worker_and_dispatcher_say_where_they_connect_without_passwords(urls: dict[str, str], tmp_path: Path) -> None:
    cluster = Cluster(database_url=urls["DATABASE_URL"], broker_url=urls["BROKER_URL"],
                      claude_url=urls["ANTHROPIC_BASE_URL"], workdir=tmp_path)
    try:
        worker = cluster.worker("validate", concurrency=1, wait=False)
        dispatcher = cluster.dispatcher(wait=False)
        for proc in (worker, dispatcher):
            cluster.wait_ready([proc])
    finally:
        cluster.stop()
    for proc in (worker, dispatcher):
        log = proc.log.read_text(errors="replace")
        assert PASSWORD not in log, proc.name
        assert urls["DATABASE_URL"].replace(PASSWORD, "***") in log, proc.name
        assert urls["BROKER_URL"].replace(PASSWORD, "***") in log, proc.name
    # The dispatcher's line is a log record (its logging is configured), not a bare print.
    assert " INFO " in next(line for line in dispatcher.log.read_text().splitlines() if "dispatcher:" in line)


def test_a_worker_names_an_unreachable_claude_url_without_its_password(urls: dict[str, str]) -> None:
    out = run({**urls, "ANTHROPIC_BASE_URL": with_password("http://127.0.0.1:9", user="proxy")},
              "worker", "--tier", "validate", "--concurrency", "1")
    assert out.returncode == 2
    assert PASSWORD not in out.stdout + out.stderr
    assert "cannot reach the Claude API at http://proxy:***@127.0.0.1:9" in out.stderr
