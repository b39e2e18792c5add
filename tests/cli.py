"""Running `switchyard` in the test's own process, through the real entry point."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from pipeline.cli import app as cli


def invoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`switchyard ARGS...` through cli.main, as a user's shell would run it: returns the exit code,
    stdout and stderr. The environment is the caller's (set it with monkeypatch first)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["switchyard", *args])
    code: Any = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return int(code), out.out, out.err
