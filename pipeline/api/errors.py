"""How errors become answers: one sentence in ``detail`` saying what and where, the right status,
and never a secret or a stack trace.

switchyard's own errors answer with the status pipeline/errors.py draws beside each in its tree,
from ``STATUS``: one entry per branch, found by the error's nearest base, so a new subclass answers
as its base does. The rest:

    request validation (FastAPI)    422  with each parameter named
    a value Postgres cannot store   422
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

from pipeline.db import is_conflict
from pipeline.errors import (
    BadItem,
    BodyTooLarge,
    BrokerDown,
    Conflict,
    InvalidInput,
    LimitExceeded,
    NotFound,
    SwitchyardError,
    Unauthorized,
    UnsupportedMediaType,
)
from pipeline.settings import mask_url

log = logging.getLogger("switchyard.api")

STATUS: dict[type[SwitchyardError], int] = {
    # What the caller can fix, or wait out.
    InvalidInput: 422,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    BodyTooLarge: 413,
    UnsupportedMediaType: 415,
    LimitExceeded: 429,
    BrokerDown: 503,
    # The rest is the server's side (its configuration, a model call): the caller can do nothing.
    SwitchyardError: 500,
}

SUBMIT_PATHS = ("/v1/jobs", "/v1/batches")
REFUSALS = {409: "batch_cancelled", 413: "too_large", 415: "media_type", 422: "invalid", 429: "tenant_limit"}
INTERNAL = "internal error: the server failed to answer this request; it has been logged"


def status_for(error: type[SwitchyardError]) -> int:
    """The status of the nearest class in ``STATUS`` that ``error`` derives from."""
    return next(STATUS[cls] for cls in error.__mro__ if cls in STATUS)


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
        status = status_for(type(exc))
        if status == 500:
            # Meant for the operator, not the caller; its message may quote a setting (masked here).
            log.error("%s while answering %s %s: %s", type(exc).__name__, request.method, request.url.path,
                      mask_url(str(exc)))
            return _answer(500, INTERNAL)
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
        return _answer(500, INTERNAL)

    @app.exception_handler(DataError)
    async def unstorable(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("refused a value the database cannot store: %s", type(exc.orig).__name__)
        return _answer(422, "a value in the request cannot be stored (for example a NUL character)")
