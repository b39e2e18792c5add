"""The operator dashboard, served by `switchyard serve` at /ui (pipeline.ui.routes)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from pipeline.ui.session import DEFAULT_TTL_S, Signer

log = logging.getLogger("switchyard.api.ui")  # under the API's logger: `serve` gives it a handler
STATIC = Path(__file__).parent / "static"


def install(app: FastAPI, *, secret: str | None, session_s: int = DEFAULT_TTL_S, secure_cookies: bool = False) -> None:
    """Mount the dashboard on ``app``: its pages, and its bundled assets at /ui/static."""
    from pipeline.ui.routes import PREFIX, UiState, router

    if not secret:
        # Sessions then end when the server restarts, and do not carry between server processes.
        log.warning("SWITCHYARD_UI_SECRET is not set: dashboard sessions are signed with a random key, "
                    "valid until this process stops")
        secret = secrets.token_urlsafe(32)
    app.state.ui = UiState(signer=Signer(secret, session_s), secure_cookies=secure_cookies)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="ui-static")
    app.include_router(router)
