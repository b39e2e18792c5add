from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pytest

from pipeline import cli


@pytest.fixture
def sy(database_url: str, monkeypatch: pytest.MonkeyPatch,
       capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`switchyard ARGS...` in this process, through the real entry point (cli.main), for tests
    that run many commands; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["switchyard", *args])
        code: Any = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return int(code), out.out, out.err

    return run


@pytest.fixture
def sy_json(sy: Callable[..., tuple[int, str, str]]) -> Callable[..., Any]:
    def run(*args: str) -> Any:
        code, out, err = sy(*args, "--json")
        assert code == 0, (args, out, err)
        return json.loads(out)

    return run
