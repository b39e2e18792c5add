"""A careless operator at the history commands: out-of-range counts, batch names the column or a
terminal cannot hold, outputs that cannot be written. Each is one sentence and exit 2, through the
real entry point on the real Postgres, and nothing already written is lost."""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import Batch, Job
from tests.cluster import SWITCHYARD
from tests.history.helpers import BAD_BATCH_NAMES, cli_env, job_line, switchyard, write_jsonl

Run = Callable[..., tuple[int, str, str]]


def _one_sentence(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    message = " ".join(err.split())
    assert message.startswith("error: ")
    return message


def _jobs(history_sessions: sessionmaker[Session], batch: str) -> int | None:
    """How many jobs the batch has; None when there is no such batch."""
    with history_sessions() as s:
        batch_id = s.scalar(select(Batch.id).where(Batch.name == batch))
        if batch_id is None:
            return None
        return s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id)) or 0


def _batches(history_sessions: sessionmaker[Session]) -> int:
    with history_sessions() as s:
        return s.scalar(select(func.count()).select_from(Batch)) or 0


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cli-input") / "jobs.jsonl", (job_line(i) for i in range(3)))


@pytest.mark.parametrize("limit", ["-1", "0", "1001", "99999999999999999999"])
def test_batches_limit_out_of_range(sy: Run, limit: str) -> None:
    message = _one_sentence(*sy("batches", "--limit", limit))
    assert "--limit" in message or "limit must be between 1 and 1000" in message


@pytest.mark.parametrize(("name", "says"), BAD_BATCH_NAMES)
def test_a_bad_batch_name_is_refused_before_anything_is_written(sy: Run, history_sessions: sessionmaker[Session],
                                                               jobs_file: Path, name: str, says: str) -> None:
    before = _batches(history_sessions)
    message = _one_sentence(*sy("enqueue", str(jobs_file), "--batch", name))
    assert says in message
    assert _batches(history_sessions) == before


def test_the_longest_batch_name_is_taken(sy_json: Callable[..., dict], jobs_file: Path) -> None:
    assert sy_json("enqueue", str(jobs_file), "--batch", "n" * 200)["accepted"] == 3


def test_a_batch_name_from_the_file_name_says_to_give_one(sy: Run, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / ("x" * 210 + ".jsonl"), [job_line(0)])
    message = _one_sentence(*sy("enqueue", str(path)))
    assert "batch name 'xxx" in message
    assert "210 characters long; at most 200" in message
    assert "comes from the file's name: give one with --batch" in message


def test_a_job_key_over_the_column_is_one_sentence(sy: Run, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "keys.jsonl", [{**job_line(0), "key": "k" * 201}])
    message = _one_sentence(*sy("enqueue", str(path), "--batch", "long-key"))
    assert "line 1: field 'key' is longer than 200 characters" in message


_LONG = "9" * 4301  # one digit past what int() converts (sys.get_int_max_str_digits)
_DEEP = "[" * 100_000  # deeper than the JSON parser recurses
_OK_LINE = '{"kind": "generate", "prompt": "ok"}\n'
_CSV_HEAD = "kind,text,labels,metadata\nclassify,ok,a|b,\n"


@pytest.mark.parametrize(("name", "content", "said"), [
    ("long.jsonl", _OK_LINE + '{"kind": "generate", "prompt": "x", "metadata": {"n": ' + _LONG + "}}\n",
     "line 2: a number has more than 4,300 digits, the most switchyard reads"),
    ("long-key.jsonl", _OK_LINE + '{"kind": "generate", "prompt": "x", "key": -' + _LONG + "}\n",
     "line 2: a number has more than 4,300 digits"),
    ("long.csv", _CSV_HEAD + 'classify,x,a|b,"{""n"": ' + _LONG + '}"\n',
     "line 3: column 'metadata': a number has more than 4,300 digits"),
    ("long-labels.csv", _CSV_HEAD + f"classify,x,[{_LONG}],\n",
     "line 3: column 'labels': a number has more than 4,300 digits"),
    ("deep.csv", _CSV_HEAD + f'classify,x,a|b,"{_DEEP}"\n', "line 3: column 'metadata': JSON is nested too deeply"),
    ("deep-labels.csv", _CSV_HEAD + f"classify,x,{_DEEP},\n", "line 3: column 'labels': JSON is nested too deeply"),
])
def test_json_the_parser_cannot_read_is_a_bad_line(sy: Run, history_sessions: sessionmaker[Session], tmp_path: Path,
                                                   name: str, content: str, said: str) -> None:
    """Valid JSON that Python's parser still refuses, with a plain ValueError (an integer of more
    digits than int() converts) or a RecursionError: a bad line like any other, not a traceback."""
    path = tmp_path / name
    path.write_text(content)
    batch = name.replace(".", "-")
    message = _one_sentence(*sy("enqueue", str(path), "--batch", batch))
    assert message.startswith(f"error: {path}, {said}"), message
    assert _jobs(history_sessions, batch) is None


def test_an_empty_file_makes_no_batch(sy: Run, history_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    message = _one_sentence(*sy("enqueue", str(tmp_path / "empty.jsonl"), "--batch", "empty-file"))
    assert message == f"error: {tmp_path / 'empty.jsonl'} has no jobs: nothing was enqueued"
    assert _jobs(history_sessions, "empty-file") is None


def test_only_bad_lines_make_no_batch_and_a_report(sy: Run, history_sessions: sessionmaker[Session],
                                                   tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n{}\n")
    message = _one_sentence(*sy("enqueue", str(path), "--batch", "all-bad", "--skip-invalid"))
    report = tmp_path / "bad.jsonl.invalid.jsonl"
    assert message == (f"error: none of the 2 lines of {path} is a valid job, so nothing was enqueued; "
                       f"the bad lines are in {report}")
    assert [json.loads(x)["line"] for x in report.read_text().splitlines()] == [1, 2]
    assert _jobs(history_sessions, "all-bad") is None


def test_invalid_report_into_a_missing_folder_writes_nothing(sy: Run, history_sessions: sessionmaker[Session],
                                                             tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(job_line(0)) + "\nnot json\n")
    report = tmp_path / "no-such-folder" / "bad.jsonl"
    message = _one_sentence(*sy("enqueue", str(path), "--batch", "report-missing", "--skip-invalid",
                                "--invalid-report", str(report)))
    assert message == f"error: cannot write {report}: No such file or directory"
    assert _jobs(history_sessions, "report-missing") is None  # checked before the first job was written


def test_invalid_report_cannot_be_the_input(sy: Run, history_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    text = json.dumps(job_line(0)) + "\nnot json\n"
    path.write_text(text)
    message = _one_sentence(*sy("enqueue", str(path), "--batch", "report-self", "--skip-invalid",
                                "--invalid-report", str(tmp_path / "." / "mixed.jsonl")))
    assert "--invalid-report" in message and "is the input file" in message
    assert path.read_text() == text
    assert _jobs(history_sessions, "report-self") is None


def test_invalid_report_without_skip_invalid_is_refused(sy: Run, tmp_path: Path, jobs_file: Path) -> None:
    message = _one_sentence(*sy("enqueue", str(jobs_file), "--batch", "no-skip", "--invalid-report",
                                str(tmp_path / "r.jsonl")))
    assert "--invalid-report is only used with --skip-invalid" in message


def test_invalid_report_that_fills_the_disk_keeps_the_jobs_written(sy: Run, history_sessions: sessionmaker[Session],
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(job_line(0)) + "\nnot json\n" + json.dumps(job_line(1)) + "\n")
    message = _one_sentence(*sy("enqueue", str(path), "--batch", "report-full", "--skip-invalid",
                                "--invalid-report", "/dev/full"))
    assert message.startswith("error: cannot write /dev/full: No space left on device")
    assert "running the same command again adds only the rest" in message
    assert _jobs(history_sessions, "report-full") == 2
    assert stat.S_ISCHR(Path("/dev/full").stat().st_mode)


@pytest.fixture(scope="module")
def exported(history_url: str, jobs_file: Path) -> str:
    switchyard(history_url, "enqueue", str(jobs_file), "--batch", "to-export")
    return "to-export"


@pytest.mark.parametrize(("out", "says"), [
    ("/dev/full", "cannot write /dev/full: No space left on device"),
    ("{tmp}/missing/out.jsonl", "cannot write {tmp}/missing/out.jsonl: No such file or directory"),
    ("{tmp}", "cannot write {tmp}: it is a folder"),
])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_to_a_path_that_cannot_be_written(sy: Run, exported: str, tmp_path: Path, out: str, says: str,
                                                 fmt: str) -> None:
    message = _one_sentence(*sy("export", exported, "--format", fmt, "--out", out.format(tmp=tmp_path)))
    assert message == "error: " + says.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_export_of_a_missing_batch_keeps_the_file(sy: Run, exported: str, tmp_path: Path) -> None:
    existing = tmp_path / "existing.jsonl"
    existing.write_text("yesterday's results\n")
    message = _one_sentence(*sy("export", "nosuch", "--out", str(existing)))
    assert "no batch named 'nosuch'" in message
    assert existing.read_text() == "yesterday's results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["existing.jsonl"]

    code, _, err = sy("export", exported, "--out", str(existing))
    assert code == 0, err
    assert [json.loads(x)["key"] for x in existing.read_text().splitlines()] == [f"job-{i:07d}" for i in range(3)]


@pytest.mark.parametrize("args", [["export", "to-export"], ["batches"]])  # written by Python, and by rich
def test_standard_output_that_cannot_be_written(history_url: str, exported: str, args: list[str]) -> None:
    with Path("/dev/full").open("w") as full:
        proc = subprocess.run([SWITCHYARD, *args], env=cli_env(history_url), stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: cannot write to standard output: No space left on device"


def test_tenant_text_is_shown_as_it_is_not_as_markup_or_terminal_codes(
        sy: Run, history_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A key, a batch name or a job's error comes from a tenant or a model: the tables print it as
    written, not as rich markup (a hyperlink the operator did not ask for) and not as escape
    sequences that drive the operator's terminal."""
    key = "[link=http://evil.example]k[/link]\x1b[2J\u202e"
    path = write_jsonl(tmp_path / "hostile.jsonl", [{**job_line(0), "key": key}])
    code, _, err = sy("enqueue", str(path), "--batch", "[red]b[/red]")
    assert code == 0, err
    with history_sessions() as s:
        job = s.scalars(select(Job).where(Job.key == key)).one()
        job.error = "[bold]failed[/bold] \x1b]0;title\x07"
        s.commit()
        job_id = job.id

    # `jobs list` without --batch, so that the batch column is shown; --wide shows the error.
    for args in (["jobs", "list", "--wide"], ["jobs", "show", str(job_id)], ["batches"],
                 ["cancel", "[red]b[/red]"]):
        code, out, err = sy(*args)
        assert code == 0, (args, err)
        assert "\x1b" not in out and "\u202e" not in out, args
        assert "[red]b[/red]" in out, args
        if args[0] == "jobs":
            # `jobs list` may fold a long key over lines; `jobs show` prints it on one.
            if args[1] == "show":
                assert "[link=http://evil.example]k[/link]\\x1b[2J\\u202e" in out, args
            assert "[bold]failed[/bold] \\x1b]0;title\\x07" in out, args


@pytest.mark.parametrize("args", [
    ["jobs", "list", "--batch", "a\udcffb"], ["jobs", "list", "--key-prefix", "a\udcffb"],
    ["jobs", "list", "--tier", "a\udcffb"], ["jobs", "show", "a\udcffb", "--batch", "to-export"],
    ["cancel", "a\udcffb"], ["export", "a\udcffb"], ["stats", "--batch", "a\udcffb"],
])
def test_an_argument_that_is_not_utf8_is_one_sentence(sy: Run, exported: str, args: list[str]) -> None:
    """A byte that is not UTF-8 on the command line reaches Python as a lone surrogate, which no
    query can send (Postgres text is UTF-8)."""
    message = _one_sentence(*sy(*args))
    assert message == "error: 'a\\udcffb' is not valid UTF-8: an argument holds a byte that is not UTF-8"
