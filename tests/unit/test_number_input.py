"""Numbers that users and operators type, outside the history commands: command-line options, the
environment, SWITCHYARD_RATE_LIMITS, a Content-Length header. A number out of range, not a number,
or spelled in another script's digits is one sentence and exit 2 (or a refusal), never a traceback
from deep inside a server, a socket or the standard library."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from starlette.requests import Request
from typer.testing import CliRunner

from pipeline.api import bodies
from pipeline.claude.ratelimit import TierLimits, parse_overrides
from pipeline.cli.app import app
from pipeline.errors import BodyTooLarge, ConfigError
from tests.cluster import SWITCHYARD

# Nothing listens on port 1: were an option not refused up front, its command would fail fast
# (and with a traceback) instead of running.
UNREACHABLE = {"DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/none",
               "BROKER_URL": "redis://127.0.0.1:1/0", "ANTHROPIC_API_KEY": "test"}


@pytest.mark.parametrize("args", [
    ["serve", "--port", "99999"],
    ["fake-claude", "--port", "99999"],
    ["fake-claude", "--port", "0", "--latency-ms", "-5"],
    ["fake-claude", "--port", "0", "--stall-seconds", "nan"],
    ["worker", "--tier", "sonnet", "--metrics-port", "99999"],
    ["dispatcher", "--metrics-port", "70000"],
    ["dispatcher", "--interval", "nan"],
    ["dispatcher", "--interval", "-1"],
    ["status", "--watch", "--interval", "inf"],
])
def test_options_out_of_range_are_refused_before_anything_runs(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, env=UNREACHABLE)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Invalid value for '--" in result.output, result.output


@pytest.mark.parametrize(("variable", "value"), [
    ("SWITCHYARD_METRICS_PORT", "abc"),
    ("SWITCHYARD_METRICS_PORT", "70000"),
    ("SWITCHYARD_DISPATCH_INTERVAL_S", "nan"),
    ("SWITCHYARD_CALL_ATTEMPTS", "²"),
])
def test_a_bad_environment_variable_is_one_sentence(tmp_path: Path, variable: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHYARD_", "DATABASE_", "ANTHROPIC_"))}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path}/none.sqlite", **{variable: value})
    proc = subprocess.run([SWITCHYARD, "jobs", "list"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {variable}={value!r}"), proc.stderr


def test_rate_limit_overrides_take_ascii_digits_only() -> None:
    base = {"sonnet": TierLimits(rpm=100)}
    assert parse_overrides("sonnet.rpm=50", base)["sonnet"].rpm == 50
    for bad in ("sonnet.rpm=²", "sonnet.rpm=٣", "sonnet.rpm=" + "9" * 5000):
        with pytest.raises(ConfigError, match="SWITCHYARD_RATE_LIMITS"):
            parse_overrides(bad, base)


def _spool(content_length: bytes, body: bytes, max_bytes: int) -> bytes:
    """``bodies.spool`` on a real Starlette request with this Content-Length header."""
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", content_length)]}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def run() -> bytes:
        with await bodies.spool(Request(scope, receive), max_bytes=max_bytes) as fh:
            return fh.read()

    return asyncio.run(run())


def test_a_content_length_that_is_no_number_is_ignored_and_the_body_still_bounded() -> None:
    # The HTTP server refuses such a header itself; should one get through, the header is no
    # number, and the body is measured as it is read, as for a body sent without a length.
    assert _spool(b"\xb2", b"[]", max_bytes=10) == b"[]"
    assert _spool(b"9" * 5000, b"[]", max_bytes=10) == b"[]"
    with pytest.raises(BodyTooLarge, match="request body is 100 bytes"):
        _spool(b"100", b"[]", max_bytes=10)
    with pytest.raises(BodyTooLarge):
        _spool(b"\xb2", b"x" * 11, max_bytes=10)
