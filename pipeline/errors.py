"""switchyard's own errors: every error it raises on purpose, in one tree.

The CLI answers each of them alike: one sentence, exit 2 (pipeline.cli.app). The API answers
with the status drawn beside each, and the sentence as ``detail`` (pipeline.api.errors looks the
status up by class, nearest base first, so a new subclass answers as its base does). The
database's and the broker's own errors are translated where they reach those two entry points;
anything else is a bug: the CLI keeps its traceback, the API answers 500 with no details.

    SwitchyardError               500  the base; raised only as one of these
    ├── InvalidInput              422  something the user wrote is malformed: a flag, a tenant name, a limit, a prefix
    │   ├── JobInputError         422  a job is invalid, or a batch name; says which line or item, and why
    │   │   ├── InputFileError    422  a whole input is unusable: missing, unreadable, the wrong format, no jobs
    │   │   └── BadItem           422  a bad job in an API request body, named by its index (array) or line
    │   └── InvalidQuery          422  a read-side query is wrong: a time, a status, a cursor, a limit
    │       └── AmbiguousBatch    422  a batch name, given without a tenant, that several tenants hold
    ├── Unauthorized              401  no bearer token, or one that is unknown, malformed or revoked
    ├── NotFound                  404  no such job, batch, tenant or token (another tenant's answers the same)
    ├── Conflict                  409  the request is well formed, but what it names is in a state that refuses it
    │   └── BatchCancelled        409  jobs sent to a batch that was cancelled
    ├── BodyTooLarge              413  a request body, or the jobs in it, over the API's limit
    ├── UnsupportedMediaType      415  a Content-Type the API does not read
    ├── LimitExceeded             429  a tenant's jobs in flight or daily spend would pass its limit (Retry-After)
    ├── BrokerDown                503  the broker (Redis) is not configured or cannot be reached
    ├── ConfigError               500  the environment, the models file, or the Claude endpoint and key are wrong
    ├── OutputError               500  a file the user named for output cannot be written (the CLI only)
    ├── WaitTimedOut              500  a command gave up waiting for a batch to end, saying where its jobs are
    ├── RateLimited               500  a tier's shared budget has no turn soon enough (in the workers only)
    │   └── Deferred              500  ...so the stage hands its job back, with the attempts made so far
    │       ├── BudgetPaused      500  ...or the call's worst case does not fit its budgets: its job is paused
    │       └── Parked            500  ...or the call waits in a message batch (economy mode) until answered
    └── ClaudeError               500  a model call failed; translated from the SDK at the client boundary
        ├── TransientClaudeError  500  worth retrying, as the SDK itself would: 408, 409, 429 with retry-after,
        │                              5xx and 529, timeouts, dropped connections
        ├── PermanentClaudeError  500  never retried: every other 4xx, and a 429 without retry-after (a spend limit)
        └── CallFailed            500  a call ended without an answer, with every attempt made (in the workers only)

500 marks what the caller of the API cannot fix: a ConfigError, an OutputError or a WaitTimedOut
meets the operator at the command line or when a process starts, and RateLimited and ClaudeError stay in the
workers, where a stage records them on the job; should one reach the API, it answers 500 with no
details and logs it.

Not in the tree, on purpose: exceptions that never reach a user, each kept beside the only code
that raises and catches it. ``IllegalTransition`` (pipeline.flow.states) is a ValueError: a stage
asked for a move the state machine forbids, which is a bug. ``SchemaUnusable``
(pipeline.flow.schema_check) becomes a validation verdict on the job. ``KeyRepeated``
(pipeline.intake.write) tells enqueue to write its input again with another writer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.claude.client import Attempt
    from pipeline.flow.budgets import Shortfall


class SwitchyardError(Exception):
    """Base of every error switchyard raises on purpose; never raised itself."""


# -- the user's mistakes ----------------------------------------------------------------------------


class InvalidInput(SwitchyardError):
    pass


class JobInputError(InvalidInput):
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


class BadItem(JobInputError):
    """A bad job in a batch body, with its index (JSON array) or line (JSON Lines)."""

    def __init__(self, reason: str, *, index: int | None = None, line: int | None = None) -> None:
        where = f"item {index}" if index is not None else f"line {line}"
        super().__init__(f"{where}: {reason}; nothing from this request was written")
        self.index = index
        self.line_number = line


class InvalidQuery(InvalidInput):
    pass


class AmbiguousBatch(InvalidQuery):
    """A batch name looked up without a tenant that several batches hold (batch names are unique
    per tenant only). ``candidates`` are (id, tenant name or None, created at), oldest first."""

    def __init__(self, message: str, *, candidates: list[tuple[int, str | None, datetime]]) -> None:
        super().__init__(message)
        self.candidates = candidates


class Unauthorized(SwitchyardError):
    pass


class NotFound(SwitchyardError):
    pass


class Conflict(SwitchyardError):
    pass


class BatchCancelled(Conflict):
    pass


class BodyTooLarge(SwitchyardError):
    pass


class UnsupportedMediaType(SwitchyardError):
    pass


class LimitExceeded(SwitchyardError):
    """A submission would take a tenant past one of its limits. Says which, and the numbers."""

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# -- the operator's side ----------------------------------------------------------------------------


class BrokerDown(SwitchyardError):
    pass


class ConfigError(SwitchyardError):
    pass


class OutputError(SwitchyardError):
    pass


class WaitTimedOut(SwitchyardError):
    pass


# -- model calls, in the workers --------------------------------------------------------------------


class RateLimited(SwitchyardError):
    """No turn within the tier's rate-limit budget soon enough; raised before any request is sent,
    so the stage hands the job back to its queue instead of holding a worker thread."""

    def __init__(self, tier: str, wait_s: float) -> None:
        super().__init__(f"tier {tier} is rate limited for another {wait_s:.1f} s")
        self.tier = tier
        self.wait_s = wait_s


class Deferred(RateLimited):
    """The tier's budget has no turn soon enough: the caller should hand the job back and try again
    in ``wait_s``. Carries the attempts already made (empty when it happens before the first)."""

    def __init__(self, tier: str, wait_s: float, attempts: list[Attempt]) -> None:
        super().__init__(tier, wait_s)
        self.attempts = attempts


class BudgetPaused(Deferred):
    """The outcome of a call that was not made because it did not fit its budgets (or because its
    job had moved on meanwhile): pipeline.flow.budgets. The job is already paused, and its call row
    dropped, when this is returned, so the stage's usual hand-back (stages._defer) finds the job gone
    from its stage and publishes nothing: no stage needs a branch of its own for it."""

    def __init__(self, tier: str, shortfall: Shortfall | None) -> None:
        super().__init__(tier, 0.0, [])
        self.shortfall = shortfall


class Parked(Deferred):
    """The call waits in a message batch (pipeline.flow.economy): the stage hands its job back, to
    wait in Postgres until the dispatcher wakes it with the answer, or ``wait_s`` at most."""

    def __init__(self, tier: str, wait_s: float) -> None:
        super().__init__(tier, wait_s, [])

    @property
    def until(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.wait_s)


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


class CallFailed(ClaudeError):
    """Raised when a call ends without an answer; carries every attempt made."""

    def __init__(self, cause: ClaudeError, attempts: list[Attempt]) -> None:
        super().__init__(str(cause), status=cause.status, error_type=cause.error_type,
                         request_id=cause.request_id, retry_after=cause.retry_after)
        self.cause = cause
        self.attempts = attempts

    @property
    def transient(self) -> bool:
        return isinstance(self.cause, TransientClaudeError)
