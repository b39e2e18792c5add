"""The fault matrix's figures (recovery times, duplicates, jobs lost), printed at the end of the run
and written as JSON to $SWITCHYARD_FAULTS_FIGURES if set.

They are gathered in whichever process ran the test. Under pytest-xdist that is a worker, whose
terminal nobody sees: each worker hands its figures to the controller when it finishes (the hooks in
tests/conftest.py), and the controller prints them all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FIGURES: dict[str, Any] = {}
_KEY = "switchyard_fault_figures"


def hand_over(workeroutput: dict[str, Any]) -> None:
    workeroutput[_KEY] = json.dumps(FIGURES)


def take_over(workeroutput: dict[str, Any]) -> None:
    FIGURES.update(json.loads(workeroutput.get(_KEY, "{}")))


def report(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault matrix figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(value)}")
    target = os.environ.get("SWITCHYARD_FAULTS_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2) + "\n")
