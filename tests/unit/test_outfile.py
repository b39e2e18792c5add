"""Files the user names (an export, a report of bad lines) are written whole or not at all, and a
path that cannot be written is one sentence, not a traceback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.cli.outfile import write_whole
from pipeline.errors import OutputError


def _leftovers(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_an_existing_file_changes_only_when_the_writing_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "results.jsonl"
    target.write_text("old\n")
    target.chmod(0o640)

    def export_of_a_missing_batch() -> None:
        with write_whole(target) as out:
            out.write("half of the new\n")
            raise LookupError("no such batch")  # what the caller found out after it began

    with pytest.raises(LookupError):
        export_of_a_missing_batch()
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, "results.jsonl") == []  # the temporary file is gone

    with write_whole(target) as out:
        out.write("new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # replaced, with the mode it had
    assert _leftovers(tmp_path, "results.jsonl") == []


def test_a_new_file_gets_the_usual_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with write_whole(tmp_path / "new.jsonl") as out:
            out.write("x\n")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.jsonl").stat().st_mode) == 0o644


@pytest.mark.parametrize(("where", "says"), [
    ("/dev/full", "cannot write /dev/full: No space left on device"),
    ("{tmp}/no/such/folder/out.jsonl", "cannot write {tmp}/no/such/folder/out.jsonl: No such file or directory"),
    ("{tmp}", "cannot write {tmp}: it is a folder"),
])
def test_an_unwritable_path_is_one_sentence(tmp_path: Path, where: str, says: str) -> None:
    path = Path(where.format(tmp=tmp_path))

    def export() -> None:
        with write_whole(path) as out:
            for _ in range(1000):  # past any buffer: the error may come at a write or at the end
                out.write("x" * 100 + "\n")

    with pytest.raises(OutputError) as info:
        export()
    assert str(info.value) == says.format(tmp=tmp_path)
    assert _leftovers(tmp_path) == []
    assert stat.S_ISCHR(Path("/dev/full").stat().st_mode)  # never renamed over


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_one_sentence(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied"), write_whole(tmp_path / "out.jsonl"):
            pass
    finally:
        tmp_path.chmod(0o755)


def test_a_device_is_written_in_place_not_replaced() -> None:
    with write_whole(Path("/dev/null")) as out:
        out.write("gone\n")
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)


def test_a_symlink_is_written_through(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "out.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    with write_whole(link) as out:
        out.write("new\n")
    assert link.is_symlink()
    assert real.read_text() == "new\n"


def test_nothing_written_leaves_nothing_when_asked(tmp_path: Path) -> None:
    report = tmp_path / "bad-lines.jsonl"
    with write_whole(report, keep_empty=False):
        pass
    assert not report.exists()
    report.write_text("from an earlier run\n")
    with write_whole(report, keep_empty=False) as out:
        out.write("")
    assert report.read_text() == "from an earlier run\n"
    assert _leftovers(tmp_path, "bad-lines.jsonl") == []
