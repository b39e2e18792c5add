"""The demo waiting for its batch: when the pipeline stalls, it gives up with one sentence that says
where the jobs are, not a traceback."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from pipeline.cli.demo import _follow
from pipeline.config import ModelConfig
from pipeline.errors import WaitTimedOut
from pipeline.intake.enqueue import enqueue_file


def test_a_stalled_demo_batch_gives_up_saying_where_its_jobs_are(sessions: sessionmaker[Session],
                                                                models: ModelConfig, tmp_path: Path) -> None:
    jobs = tmp_path / "stalled.jsonl"
    jobs.write_text("".join(f'{{"kind": "generate", "prompt": "job {i}"}}\n' for i in range(3)))
    report = enqueue_file(sessions, jobs, batch="demo-stalled", config=models)
    assert report.batch_id is not None
    # No dispatcher and no worker run: the jobs stay queued.
    p = cast(Any, SimpleNamespace(sessions=sessions))
    with pytest.raises(WaitTimedOut) as caught:
        _follow(p, report.batch_id, Console(file=io.StringIO()), timeout_s=0)
    assert str(caught.value) == ("the demo batch did not finish within 0 s: 0 of 3 jobs ended, and 3 queued; "
                                 "the log above may say why")
