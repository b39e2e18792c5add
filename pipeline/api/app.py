"""`switchyard serve`: the HTTP API. ``create_app`` builds it from plain arguments (the CLI reads
Settings and passes them), so tests can run it on any database and broker."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from pipeline import ui
from pipeline.api import errors, routes, schemas
from pipeline.api.deps import ApiState, Who, state
from pipeline.api.metrics import ApiMetrics, LiveCollector, MetricsMiddleware
from pipeline.claude.ratelimit import RedisRateLimiter, TierLimits
from pipeline.config import ModelConfig
from pipeline.db import make_engine, session_factory
from pipeline.settings import Settings

log = logging.getLogger("switchyard.api")

# The only endpoints that answer without a token: the health check (for load balancers), and the
# API's description, which is the same for every deployment and names no tenant. They are the three
# routes that create_app defines itself below; every other route depends on `caller` (deps.py),
# the /v1 router as a whole. tests/api/test_auth.py checks every route of the app against this.
HEALTHZ, OPENAPI, DOCS = "/healthz", "/openapi.json", "/docs"
PUBLIC_PATHS = (HEALTHZ, OPENAPI, DOCS)

DESCRIPTION = f"""\
Submit bulk Claude work, follow it, and fetch its results. Every endpoint but `{HEALTHZ}`,
`{OPENAPI}` and `{DOCS}` needs `Authorization: Bearer <token>`; a token belongs to one tenant,
which sees only its own jobs and batches. Errors answer `{{"detail": "<one sentence>"}}`."""


def broker_client(broker_url: str) -> redis.Redis | None:
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(broker_url, socket_timeout=3, socket_connect_timeout=3)


def create_app(*, database_url: str, broker_url: str, models: ModelConfig, tier_limits: Mapping[str, TierLimits],
               rate_window_s: float, max_body_bytes: int, max_batch_jobs: int, pool_size: int = 10,
               ui_secret: str | None = None, ui_session_s: int = 8 * 3600, ui_secure_cookies: bool = False) -> FastAPI:
    broker = broker_client(broker_url)
    api = ApiState(
        sessions=session_factory(make_engine(database_url, pool_size=pool_size)),
        models=models,
        broker=broker,
        limiter=RedisRateLimiter(broker, tier_limits, window_s=rate_window_s) if broker is not None else None,
        queues=models.queues,
        max_body_bytes=max_body_bytes,
        max_batch_jobs=max_batch_jobs,
    )
    # FastAPI's own documentation routes are off (ReDoc and the OAuth2 redirect page too): the two
    # that are public are defined below, as routes of the app like any other.
    app = FastAPI(title="switchyard", version="1", description=DESCRIPTION, openapi_url=None, docs_url=None,
                  redoc_url=None,
                  responses={500: {"model": schemas.Error, "description": "A bug: reported without details."}})
    app.state.api = api
    metrics = ApiMetrics()
    metrics.registry.register(LiveCollector(api))
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    errors.install(app)
    app.include_router(routes.router)
    # The dashboard (/ui): its own sign-in, a session cookie instead of the bearer token.
    ui.install(app, secret=ui_secret, session_s=ui_session_s, secure_cookies=ui_secure_cookies)

    @app.get(OPENAPI, include_in_schema=False)
    def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI, title="switchyard API")

    @app.get(HEALTHZ, response_model=schemas.Health, tags=["ops"],
             responses={503: {"model": schemas.Health, "description": "Postgres or the broker is unreachable."}})
    def healthz(request: Request) -> JSONResponse:
        """Postgres and the broker answer. Needs no token (for load balancers) and says nothing
        else."""
        return _health(state(request))

    @app.get("/metrics", tags=["ops"], response_class=Response, responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
              "description": "Prometheus text format."}, **routes.ERRORS})
    def prometheus(_who: Who) -> Response:
        """Prometheus metrics: requests, latency, submissions, queue depths, unfinished jobs."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _health(api: ApiState) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with api.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except SQLAlchemyError as exc:
        # The driver's message can hold the connection string: the class says enough.
        checks["postgres"] = f"unreachable ({type(exc).__name__})"
    if api.broker is None:
        checks["broker"] = "not checked (not Redis)"
    else:
        try:
            api.broker.ping()
            checks["broker"] = "ok"
        except redis.RedisError as exc:
            checks["broker"] = f"unreachable ({type(exc).__name__})"
    ok = checks["postgres"] == "ok" and not checks["broker"].startswith("unreachable")
    return JSONResponse({"status": "ok" if ok else "failing", **checks}, status_code=200 if ok else 503)


def app_from_env() -> FastAPI:
    """For `uvicorn --factory pipeline.api.app:app_from_env` (and `switchyard serve`)."""
    s = Settings()
    if not log.handlers:
        # uvicorn configures its own loggers only; submissions and cancels are worth a line too.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return create_app(database_url=s.database_url, broker_url=s.broker_url, models=s.models,
                      tier_limits=s.tier_limits(), rate_window_s=s.rate_window_s,
                      max_body_bytes=s.api_max_body_bytes, max_batch_jobs=s.api_max_batch_jobs,
                      ui_secret=s.ui_secret, ui_session_s=s.ui_session_s, ui_secure_cookies=s.ui_secure_cookies)
