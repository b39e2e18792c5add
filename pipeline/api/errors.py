"""How errors become answers: one sentence in ``detail`` saying what and where, the right status,
and never a secret or a stack trace.

    SwitchyardError                 400, unless one of these:
    ├── Unauthorized                401  (WWW-Authenticate: Bearer)
    ├── NotFound                    404  (also for another tenant's job or batch)
    ├── BatchCancelled              409
    ├── BodyTooLarge                413
    ├── UnsupportedMediaType        415
    ├── JobInputError, InvalidQuery 422  (a bad item names its index or line)
    ├── LimitExceeded               429  (Retry-After)
    └── BrokerDown                  503
    request validation (FastAPI)    422  with each parameter named
    the database unreachable        503
    a deadlock it could not retry   503  (Retry-After; a submission is retried a few times first)
    anything else (a bug)           500  with no details
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException

from pipeline.api.bodies import BodyTooLarge, UnsupportedMediaType
from pipeline.db import is_conflict
from pipeline.errors import BatchCancelled, InvalidQuery, JobInputError, NotFound, SwitchyardError
from pipeline.tenants import LimitExceeded

log = logging.getLogger("switchyard.api")


class Unauthorized(SwitchyardError):
    pass


class BrokerDown(SwitchyardError):
    pass


STATUS: list[tuple[type[SwitchyardError], int]] = [
    (Unauthorized, 401),
    (NotFound, 404),
    (BatchCancelled, 409),
    (BodyTooLarge, 413),
    (UnsupportedMediaType, 415),
    (JobInputError, 422),
    (InvalidQuery, 422),
    (LimitExceeded, 429),
    (BrokerDown, 503),
]


SUBMIT_PATHS = ("/v1/jobs", "/v1/batches")
REFUSALS = {409: "batch_cancelled", 413: "too_large", 415: "media_type", 422: "invalid", 429: "tenant_limit"}


class BadItem(JobInputError):
    """A bad job in a batch body, with its index (JSON array) or line (JSON Lines)."""

    def __init__(self, reason: str, *, index: int | None = None, line: int | None = None) -> None:
        where = f"item {index}" if index is not None else f"line {line}"
        super().__init__(f"{where}: {reason}; nothing from this request was written")
        self.index = index
        self.line_number = line


def _answer(status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, headers=headers)


def _where(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "request"
    source, *rest = loc
    name = ".".join(str(p) for p in rest)
    if source == "body":
        return f"body field {name!r}" if name else "body"
    if source in ("query", "path", "header", "cookie"):
        return f"{source} parameter {name!r}"
    return ".".join(str(p) for p in loc)


def install(app: FastAPI) -> None:
    @app.exception_handler(SwitchyardError)
    async def switchyard_error(request: Request, exc: SwitchyardError) -> JSONResponse:
        status = next((code for cls, code in STATUS if isinstance(exc, cls)), 400)
        if request.method == "POST" and request.url.path in SUBMIT_PATHS and status != 401:
            request.app.state.metrics.refused.labels(REFUSALS.get(status, "other")).inc()
        headers: dict[str, str] = {}
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, LimitExceeded) and exc.retry_after_s:
            headers["Retry-After"] = str(exc.retry_after_s)
        extra: dict[str, Any] = {}
        if isinstance(exc, BadItem):
            extra = {"item": exc.index, "line": exc.line_number}
        return _answer(status, str(exc), headers=headers or None, **extra)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default lists pydantic's internals; say instead which parameter and what is wrong.
        problems = [{"where": _where(tuple(e.get("loc", ()))), "problem": e.get("msg", "is invalid")}
                    for e in exc.errors()]
        detail = "; ".join(f"{p['where']}: {p['problem']}" for p in problems) or "the request is invalid"
        return _answer(422, detail, errors=problems)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _answer(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(psycopg.OperationalError)  # the driver's own, unwrapped, from a submission's COPY
    async def database_down(_request: Request, exc: OperationalError | psycopg.OperationalError) -> JSONResponse:
        # The driver's message can hold the connection string: log the class only.
        orig = exc.orig if isinstance(exc, OperationalError) else exc
        cause = type(orig or exc).__name__
        if is_conflict(exc):
            # Not an outage: Postgres aborted this request's transaction to break a deadlock or a
            # serialization conflict with a concurrent one (submissions have already retried it).
            log.warning("request aborted by the database to resolve a conflict: %s", cause)
            return _answer(503, "the request collided with concurrent ones in the database and was not applied; "
                                "send it again", headers={"Retry-After": "1"})
        log.error("database unavailable: %s", cause)
        return _answer(503, "the database is unavailable; try again shortly", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def bug(_request: Request, _exc: Exception) -> JSONResponse:
        # A bug. Starlette logs the traceback after this answer; the caller gets no details.
        return _answer(500, "internal error: the server failed to answer this request; it has been logged")

    @app.exception_handler(DataError)
    async def unstorable(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("refused a value the database cannot store: %s", type(exc.orig).__name__)
        return _answer(422, "a value in the request cannot be stored (for example a NUL character)")
