"""Writing a file the user named (an export, a report of bad lines): whole, or not at all.

The text goes to a temporary file in the target's folder, which takes the target's name (one
rename) only once all of it is written and on disk. Until then the target is as it was: an export
that fails half-way (no such batch, a full disk, Ctrl-C) never leaves an emptied or truncated file
that looks like a result, and its temporary file is removed. A symlink is followed, so the file it
names is the one replaced. A target that is not a regular file (``/dev/stdout``, a named pipe,
``/dev/null``) cannot be replaced, and renaming over it would replace the device itself: it is
written in place.

Every way the path cannot be written is one OutputError naming the path and the system's reason.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from pipeline.errors import OutputError


class Output:
    """What ``write_whole`` hands out: ``write`` text to it. A failed write is an OutputError."""

    def __init__(self, fh: IO[str], path: Path) -> None:
        self._fh = fh
        self._path = path
        self.written = 0

    def write(self, text: str, /) -> int:
        try:
            n = self._fh.write(text)
        except OSError as exc:
            raise _cannot(self._path, exc) from None
        self.written += n
        return n


def _cannot(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


@contextmanager
def write_whole(path: Path, *, keep_empty: bool = True) -> Iterator[Output]:
    """Write ``path`` (UTF-8, newlines as written) from what the block writes, replacing it only
    if the block ends without an error. Without ``keep_empty``, a block that wrote nothing leaves
    the path as it was. The path is checked, and the temporary file made, on entry: a path that
    cannot be written is refused before the caller does any work."""
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _cannot(path, exc) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write {path}: it is a folder")
    if st is not None and not stat.S_ISREG(st.st_mode):
        with _in_place(path, target) as out:
            yield out
        return
    if st is not None and not os.access(target, os.W_OK):
        raise _cannot(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))

    # Hidden, and short enough for any file name the target may have (names are at most 255 bytes).
    tmp = target.with_name(f".{target.name[:40]}.{secrets.token_hex(4)}.partial")
    try:
        # A new file gets the mode an ordinary open would give it (0666 less the umask); a replaced
        # one keeps its own.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 if st is None else 0o600)
    except OSError as exc:
        raise _cannot(path, exc) from None
    fh = os.fdopen(fd, "w", encoding="utf-8", newline="")
    done = False
    try:
        if st is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        out = Output(fh, path)
        yield out
        if out.written or keep_empty:
            try:
                fh.flush()
                os.fsync(fd)
                fh.close()
                os.replace(tmp, target)
            except OSError as exc:
                raise _cannot(path, exc) from None
            done = True
    finally:
        if not done:
            with suppress(OSError):
                fh.close()
            with suppress(FileNotFoundError):
                tmp.unlink()


@contextmanager
def _in_place(path: Path, target: Path) -> Iterator[Output]:
    try:
        fh = target.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise _cannot(path, exc) from None
    try:
        yield Output(fh, path)
        try:
            fh.flush()
        except OSError as exc:
            raise _cannot(path, exc) from None
    finally:
        with suppress(OSError):  # a flush that failed above fails again here: it was reported
            fh.close()
