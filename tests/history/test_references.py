"""A batch or job reference, a cursor and a relative age as a careless (or hostile) user types
them: digits from other scripts, ids past 64 bits, ages past the calendar. Each is one sentence
and exit 2, through the real entry point on the real Postgres; never a traceback."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pipeline.config import ModelConfig
from pipeline.errors import InvalidQuery
from pipeline.intake.enqueue import enqueue_file
from pipeline.queries import history
from tests.history.helpers import job_line, switchyard, write_jsonl

BIG = "99999999999999999999"  # past 2**64


def _cursor(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def three_jobs(history_sessions: sessionmaker[Session], models: ModelConfig,
               tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """A batch named "refs" of three jobs, whose ids are 1, 2 and 3 on this fresh database."""
    path = write_jsonl(tmp_path_factory.mktemp("refs") / "refs.jsonl", (job_line(i) for i in range(3)))
    report = enqueue_file(history_sessions, path, batch="refs", config=models)
    assert report.accepted == 3
    return [1, 2, 3]


@pytest.mark.parametrize(("args", "said"), [
    # Digits of other scripts: str.isdigit() says yes, and int() then fails (or, for the
    # Arabic-Indic ٣, reads an id the user was never shown).
    (["jobs", "list", "--batch", "³"], "no batch named '³'"),
    (["stats", "--batch", "⁴"], "no batch named '⁴'"),
    (["cancel", "⁵"], "no batch named '⁵'"),
    (["export", "⁶"], "no batch named '⁶'"),
    (["jobs", "show", "²"], "'²' is not a job id"),
    (["jobs", "show", "٣"], "'٣' is not a job id"),
    (["cancel", "٣"], "no batch named '٣'"),
    # Past 64 bits: no row has such an id, and the database cannot even compare one.
    (["jobs", "show", BIG], f"'{BIG}' is not a job id (a whole number up to 9223372036854775807)"),
    (["jobs", "show", "9" * 5000], "is not a job id"),  # int() refuses over 4,300 digits
    (["jobs", "list", "--batch", BIG], f"no batch named '{BIG}'"),
    (["export", BIG], f"no batch named '{BIG}'"),
    (["jobs", "list", "--cursor", _cursor(f"j1:{BIG}")], "is not one that `jobs list` printed"),
    (["jobs", "list", "--cursor", _cursor("j1:³")], "is not one that `jobs list` printed"),
    # Ages past the calendar.
    (["jobs", "list", "--since", "99999999999d"], "--since '99999999999d' is too far back"),
    (["jobs", "list", "--until", "1000000000h"], "--until '1000000000h' is too far back"),
    (["stats", "--since", "99999999999w"], "--since '99999999999w' is too far back"),
    # More digits than int() converts (4,300), whether nines or zeros in front of a small number.
    (["jobs", "list", "--since", "9" * 5000 + "d"], "is too far back"),
    (["stats", "--until", "9" * 5000 + "h"], "is too far back"),
    (["jobs", "show", "0" * 5000 + "9"], "no job with id 9"),
    (["cancel", "0" * 5000 + "9"], "no batch named '000"),
    (["export", "0" * 5000 + "9"], "no batch named '000"),
])
def test_odd_references_are_one_sentence(sy, three_jobs: list[int], args: list[str], said: str) -> None:
    code, out, err = sy(*args)
    assert code == 2, (args, out, err)
    assert said in " ".join(err.split()), (args, err)


def test_a_plain_id_and_a_name_of_digits_still_work(sy, sy_json, three_jobs: list[int]) -> None:
    assert sy_json("jobs", "show", "3")["job"]["id"] == 3
    batch_id = sy_json("batches")[0]["id"]
    assert sy_json("jobs", "list", "--batch", str(batch_id))["jobs"][0]["batch"] == "refs"
    code, _, err = sy("jobs", "show", "0")
    assert code == 2
    assert "no job with id 0" in err
    # Zeros in front change no id, however many (int() alone refuses more than 4,300 digits).
    assert sy_json("jobs", "show", "0" * 5000 + "3")["job"]["id"] == 3
    assert sy_json("stats", "--batch", "0" * 5000 + str(batch_id))["jobs"] == 3
    assert [j["id"] for j in sy_json("jobs", "list", "--cursor", _cursor("j1:" + "0" * 5000 + "3"))["jobs"]] == [2, 1]


def test_as_a_process_no_traceback(history_url: str, three_jobs: list[int]) -> None:
    for args in (["jobs", "show", "²"], ["jobs", "show", BIG], ["jobs", "list", "--since", "99999999999d"]):
        proc = switchyard(history_url, *args, ok=False)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_parse_id_reads_ascii_digits_only() -> None:
    assert history.parse_id("42") == 42
    for text in ("²", "٣", "+1", "1_0", " 7", "-3", "", "0x10"):
        assert history.parse_id(text) is None, text
    assert history.parse_id("0" * 30 + "42") == 42
    assert history.parse_id("0" * 5000 + "42") == 42  # past the digits int() converts, but the same id
    assert history.parse_id(str(history.MAX_ID)) == history.MAX_ID
    for text in (str(history.MAX_ID + 1), BIG, "9" * 5000):
        assert history.parse_id(text) is None


def test_ages_are_bounded() -> None:
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert history.parse_time(f"{history.MAX_AGE.days}d", now=now) == now - history.MAX_AGE
    for text in (f"{history.MAX_AGE.days + 1}d", "99999999999d", "1000000000h", "9" * 40 + "s", "9" * 5000 + "d"):
        with pytest.raises(InvalidQuery, match="too far back"):
            history.parse_time(text, now=now)
    assert history.parse_time("0" * 5000 + "2d", now=now) == now - timedelta(days=2)
