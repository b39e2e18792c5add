"""The `switchyard` command's entry point. Each command reads Settings once and calls the domain
library; the commands live by group in pipeline/cli/ (operate, history, tasks, tenants), and importing
them here registers them on the app.

A user's mistake (a bad file, a bad flag, an unreachable database) prints one sentence and exits
2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import os
import re
import sys

from rich.text import Text

import pipeline.cli.budgets
import pipeline.cli.history
import pipeline.cli.operate
import pipeline.cli.quality
import pipeline.cli.tasks
import pipeline.cli.tenants
import pipeline.cli.whatif  # noqa: F401  (registers tokens, tenants, serve; whatif, calibrate)
from pipeline.cli.common import app, err
from pipeline.errors import SwitchyardError
from pipeline.settings import mask_url

__all__ = ["app", "main"]


def _error(message: str) -> None:
    # Text, not markup: a message may quote the user's own brackets ("[tiers.opus]", a job's text).
    # Masked: a driver's message may quote DATABASE_URL or BROKER_URL, password and all.
    err.print(Text.assemble(("error: ", "red"), mask_url(message)), highlight=False, soft_wrap=True)


def _missing_table(exc: Exception) -> str | None:
    """The driver's words for a table that does not exist (a database never migrated), else None.
    Postgres says it with SQLSTATE 42P01, SQLite with "no such table"."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig):
        return str(orig).strip().splitlines()[0]
    return None


def main() -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from psycopg import OperationalError as DriverError
    from sqlalchemy.exc import OperationalError as DatabaseError
    from sqlalchemy.exc import ProgrammingError

    from pipeline.db import is_conflict

    try:
        app()
    except SwitchyardError as exc:
        _error(str(exc))
        sys.exit(2)
    except (DatabaseError, ProgrammingError, DriverError) as exc:
        # DriverError: the driver's own, unwrapped, from the COPYs that enqueue runs on its connection.
        missing = _missing_table(exc)
        if missing is None and isinstance(exc, ProgrammingError):
            raise  # a statement of ours is wrong: a bug, and its traceback is what to report
        orig = exc.orig if isinstance(exc, DatabaseError | ProgrammingError) else exc
        first = str(orig).strip().splitlines()[0] if orig else str(exc)
        if is_conflict(exc):
            # Not the database's address or health: it picked this command's transaction to abort.
            _error(f"the database aborted this command because it conflicted with concurrent work "
                   f"({type(orig).__name__}); run it again")
        elif missing is not None:
            _error(f"the database at DATABASE_URL has no switchyard tables yet ({missing}): "
                   f"run 'switchyard db upgrade' first")
        else:
            _error(f"cannot use the database (DATABASE_URL): {first}")
        sys.exit(2)
    except BrokerError as exc:
        _error(f"cannot reach the broker (BROKER_URL): {exc}")
        sys.exit(2)
    except UnicodeEncodeError as exc:
        # A byte that is not UTF-8 in an argument reaches Python as a lone surrogate
        # (surrogateescape), which no text sent to Postgres can hold. Refused where it is used as
        # text, not at the start: a file name may hold one and still be opened.
        arg = next((a for a in sys.argv[1:] if _SURROGATE.search(a)), None)
        if exc.reason != "surrogates not allowed" or arg is None:
            raise
        from pipeline.names import quoted

        _error(f"{quoted(arg)} is not valid UTF-8: an argument holds a byte that is not UTF-8")
        sys.exit(2)
    except OSError as exc:
        # A write that failed with no file named is standard output's: every file the commands
        # write themselves is written by pipeline.cli.outfile, which says which file it was.
        if exc.errno not in _OUTPUT_FULL or exc.filename is not None:
            raise
        _error(f"cannot write to standard output: {exc.strerror}")
        # What is still buffered goes nowhere, so the interpreter's own flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(2)


# What a byte that is not UTF-8 becomes in sys.argv.
_SURROGATE = re.compile(r"[\udc80-\udcff]")
# Standard output redirected to a full disk or an unwritable device. A closed pipe (`| head`) is
# not an error to report: click already exits quietly for it.
_OUTPUT_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


if __name__ == "__main__":
    main()
