"""switchyard's own errors.

    SwitchyardError
    ├── ConfigError            the configuration (environment or models file) is wrong
    ├── JobInputError          a job the user submitted is invalid; says which line and why
    │   ├── InputFileError     a whole input file is unusable (missing, unreadable, wrong format)
    │   └── BatchCancelled     jobs sent to a batch that was cancelled
    ├── NotFound               a job or batch id that does not exist
    ├── RateLimited            a tier's shared budget has no turn for a call soon enough
    ├── InvalidQuery           a history query the user wrote wrongly (a bad time, cursor, limit)
    │   └── AmbiguousBatch     a batch name, given without a tenant, that several batches hold
    ├── OutputError            a file the user named for output cannot be written (a missing folder, a full disk)
    └── ClaudeError            a model call failed; translated from the SDK at the client boundary
        ├── TransientClaudeError   worth retrying, as the SDK itself would: 408, 409, 429 with
        │                          retry-after, 5xx and 529, timeouts, dropped connections
        └── PermanentClaudeError   never retried: every other 4xx, and a 429 without retry-after
                                   (a spend limit)

The CLI prints any SwitchyardError as one sentence and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from datetime import datetime


class SwitchyardError(Exception):
    """Base of every error switchyard raises on purpose."""


class ConfigError(SwitchyardError):
    pass


class JobInputError(SwitchyardError):
    def __init__(self, message: str, *, line: int | None = None, source: str | None = None) -> None:
        self.line = line
        self.source = source
        self.reason = message
        where = ""
        if source is not None and line is not None:
            where = f"{source}, line {line}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + message)


class InputFileError(JobInputError):
    pass


class BatchCancelled(JobInputError):
    pass


class NotFound(SwitchyardError):
    pass


class RateLimited(SwitchyardError):
    """No turn within the tier's rate-limit budget soon enough; raised before any request is sent,
    so the stage hands the job back to its queue instead of holding a worker thread."""

    def __init__(self, tier: str, wait_s: float) -> None:
        super().__init__(f"tier {tier} is rate limited for another {wait_s:.1f} s")
        self.tier = tier
        self.wait_s = wait_s


class InvalidQuery(SwitchyardError):
    pass


class AmbiguousBatch(InvalidQuery):
    """A batch name looked up without a tenant that several batches hold (batch names are unique
    per tenant only). ``candidates`` are (id, tenant name or None, created at), oldest first."""

    def __init__(self, message: str, *, candidates: list[tuple[int, str | None, datetime]]) -> None:
        super().__init__(message)
        self.candidates = candidates


class OutputError(SwitchyardError):
    pass


class ClaudeError(SwitchyardError):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.request_id = request_id
        self.retry_after = retry_after


class TransientClaudeError(ClaudeError):
    pass


class PermanentClaudeError(ClaudeError):
    pass
