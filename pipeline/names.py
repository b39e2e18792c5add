"""Text that people read back: the rule for a batch name, and what a terminal would act on.

A batch name is shown in listings, logs and terminals, so one rule, ``check_batch_name``, decides
what a name may be, for the CLI (``--batch``, or the file's name) and the API alike. Text that is
not ours to check (a job's key, a model's reason, an error quoting either) is shown with the same
characters escaped instead (pipeline.cli.history). Kept free of heavy imports: every command
loads it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from pipeline.errors import JobInputError

MAX_BATCH_NAME_LENGTH = 200  # batches.name
# What a terminal or a log acts on rather than shows: C0 and C1 controls (ESC begins the sequences
# that move the cursor, clear the screen, set the title, make hyperlinks), line and paragraph
# separators, and the bidirectional controls that reorder the text after them ("invoice\u202etxt.exe"
# reads "invoiceexe.txt").
UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def quoted(value: Any, limit: int = 60) -> str:
    """A value quoted in a message (repr, so every control character is escaped), cut so that a
    hostile one cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def escaped(text: str) -> str:
    """``text`` with every UNSHOWABLE character written as its escape (``\\x1b``, ``\\u202e``)."""
    return UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def check_batch_name(name: str) -> str:
    """The batch name, or JobInputError saying what is wrong with it. A name fits its column, is
    not only whitespace, holds nothing UNSHOWABLE, and was valid UTF-8: invalid UTF-8 arrives from
    the command line as lone surrogates (Python's surrogateescape) and from an HTTP query string
    as U+FFFD."""
    if not name:
        raise JobInputError("batch name must not be empty")
    shown = quoted(name)
    if len(name) > MAX_BATCH_NAME_LENGTH:
        raise JobInputError(f"batch name {shown} is {len(name):,} characters long; at most {MAX_BATCH_NAME_LENGTH}")
    if not name.strip():
        raise JobInputError(f"batch name {shown} must not be only whitespace")
    if "\ufffd" in name or any(unicodedata.category(c) == "Cs" for c in name):
        raise JobInputError(f"batch name {shown} is not valid UTF-8")
    found = UNSHOWABLE.search(name)
    if found:
        char = found.group()
        category = unicodedata.category(char)
        what = ("a control character" if category == "Cc" else
                "a line or paragraph separator" if category in ("Zl", "Zp") else "a bidirectional control character")
        raise JobInputError(f"batch name {shown} contains {what} (U+{ord(char):04X})")
    return name
