"""Running the real `switchyard` command against the test database, and job files to feed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.cluster import SWITCHYARD

LABELS = ["billing", "bug", "account", "other"]

# Batch names refused by one rule, whether a name comes from the CLI (--batch, or the file's name) or
# the API; with the words the refusal must hold.
BAD_BATCH_NAMES: list[tuple[str, str]] = [
    ("", "must not be empty"),
    ("   ", "must not be only whitespace"),
    ("\t\u3000", "must not be only whitespace"),
    ("x" * 201, "201 characters long; at most 200"),
    ("a\x01b", "a control character (U+0001)"),
    ("line\nbreak", "a control character (U+000A)"),
    ("a\x7fb", "a control character (U+007F)"),
    ("a\x85b", "a control character (U+0085)"),
    ("a\u2028b", "a line or paragraph separator (U+2028)"),
    ("invoice\u202etxt.exe", "a bidirectional control character (U+202E)"),
    ("a\u2066b", "a bidirectional control character (U+2066)"),
    ("a\u200fb", "a bidirectional control character (U+200F)"),
    ("a\udcffb", "not valid UTF-8"),  # how Python hands over an undecodable byte of argv
    ("a\ufffdb", "not valid UTF-8"),  # how an HTTP server hands over one of a query string
]


def cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SWITCHYARD_", "DATABASE_"))}
    env.update({"DATABASE_URL": database_url, "COLUMNS": "200"})
    return env


def switchyard(database_url: str, *args: str, ok: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `switchyard ARGS...` as an operator would; fail the test with its output if it fails."""
    proc = subprocess.run([SWITCHYARD, *args], env=cli_env(database_url), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if ok and proc.returncode != 0:
        raise AssertionError(f"switchyard {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def switchyard_json(database_url: str, *args: str) -> Any:
    return json.loads(switchyard(database_url, *args, "--json").stdout)


def peak_rss_kb(database_url: str, *args: str) -> int:
    """Peak resident memory of one `switchyard ARGS...` process, in KiB. A fresh Python process
    runs it and reports RUSAGE_CHILDREN, so only that one child is counted."""
    probe = ("import resource, subprocess, sys\n"
             "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
             "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", probe, SWITCHYARD, *args], env=cli_env(database_url),
                         capture_output=True, text=True, timeout=600, check=True)
    rc, rss = out.stdout.split()
    assert rc == "0", out.stderr
    return int(rss)


def job_line(i: int, *, hint: str = "") -> dict[str, Any]:
    kind = ("classify", "generate", "draft", "extract")[i % 4]
    job: dict[str, Any] = {"key": f"job-{i:07d}", "kind": kind}
    if kind == "classify":
        job |= {"text": f"Ticket {i}: I was charged twice. {hint}", "labels": LABELS}
    elif kind == "generate":
        job |= {"prompt": f"Summarise item {i} in two lines. {hint}"}
    elif kind == "draft":
        job |= {"instructions": f"Apologise for order {i}. {hint}", "context": "Late by 3 days."}
    else:
        job |= {"text": f"Receipt {i} for Dana, 42.50. {hint}",
                "schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}
    return job


def write_jsonl(path: Path, jobs: Iterable[dict[str, Any]]) -> Path:
    with path.open("w") as fh:
        for job in jobs:
            fh.write(json.dumps(job) + "\n")
    return path
