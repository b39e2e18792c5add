"""The dashboard at /ui: server-rendered pages (Jinja2), with htmx re-fetching their live parts
every few seconds and uPlot drawing the charts from small JSON documents. Every page but the
sign-in needs a session (pipeline.ui.session); every read is confined to the caller's scope, as the
API's are (an operator's token sees every tenant); the one action that changes state, cancelling a
batch, goes through a confirmation page and a form carrying the session's CSRF token."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from pipeline import tenants
from pipeline.api.deps import ApiState, state
from pipeline.api.errors import status_for
from pipeline.errors import BrokerDown, InvalidQuery, SwitchyardError
from pipeline.models import JobStatus, utcnow
from pipeline.queries import history
from pipeline.settings import mask_url
from pipeline.tenants import Caller
from pipeline.ui import data
from pipeline.ui.session import COOKIE, Signer, UiSession, caller_for, csrf_ok
from pipeline.ui.timeline import lanes, moments

log = logging.getLogger("switchyard.api.ui")  # under the API's logger: `serve` gives it a handler

PREFIX = "/ui"
LOGIN = f"{PREFIX}/login"
LOGIN_COOKIE = "switchyard_login"  # the sign-in form's CSRF secret, before there is a session
MAX_FORM_BYTES = 16 * 1024
CHART_HOURS = 6  # the overview's charts: the last hours, in 5-minute buckets
PAGE = 50

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@dataclass
class UiState:
    signer: Signer
    secure_cookies: bool  # Secure flag on the cookies (set when served over HTTPS)


def ui_state(request: Request) -> UiState:
    return request.app.state.ui  # type: ignore[no-any-return]


class SignInRequired(Exception):
    pass


@dataclass(frozen=True)
class Viewer:
    who: Caller
    session: UiSession


def viewer(request: Request) -> Viewer:
    s = ui_state(request).signer.read(request.cookies.get(COOKIE))
    if s is None:
        raise SignInRequired
    with state(request).sessions() as db:
        who = caller_for(db, s.prefix)
    if who is None:  # revoked since sign-in
        raise SignInRequired
    request.state.tenant = who.tenant
    return Viewer(who, s)


Signed = Annotated[Viewer, Depends(viewer)]


# Every page: scripts only from the server's own files (no inline script, no eval), no framing by
# another site (a framed confirmation page could be clicked through), no referrer beyond the site.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class UiRoute(APIRoute):
    """Errors as pages, not the API's JSON: a missing session sends the browser to the sign-in
    (htmx through its HX-Redirect header), and a SwitchyardError (no such batch, a bad filter)
    renders its one sentence with its status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            response = await answer(request)
            response.headers.update(SECURITY_HEADERS)
            return response

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                if request.headers.get("HX-Request"):
                    return Response(status_code=401, headers={"HX-Redirect": LOGIN})
                return RedirectResponse(LOGIN, status_code=303)
            except SwitchyardError as exc:
                try:
                    v: Viewer | None = viewer(request)  # the page keeps its navigation
                except (SignInRequired, SwitchyardError):
                    v = None
                code = status_for(type(exc))
                message = str(exc) if code < 500 else "something went wrong on the server; its log says what"
                if code >= 500:
                    # Meant for the operator; the message may quote a setting (masked, as the API does).
                    log.error("%s while answering %s %s: %s", type(exc).__name__, request.method,  # noqa: TRY400
                              request.url.path, mask_url(str(exc)))
                return page(request, "error.html", v, code, message=message, code=code)

        return run


router = APIRouter(prefix=PREFIX, route_class=UiRoute, include_in_schema=False)


# -- formatting ------------------------------------------------------------------------------------


def _money(value: Decimal | str | None) -> str:
    return data.money(Decimal(value) if isinstance(value, str) else value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


templates.env.filters.update(money=_money, duration=_duration, when=_when, pct=_pct, ms=_ms)
templates.env.globals.update(STATUSES=[s.value for s in JobStatus], PREFIX=PREFIX)


def page(request: Request, name: str, v: Viewer | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    # palette: every tier in a fixed order, so a tier has one colour on every page and chart.
    base = {"viewer": v, "csrf": v.session.csrf if v else None, "now": utcnow(),
            "palette": list(state(request).models.tiers)}
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def _htmx(request: Request) -> bool:
    """An htmx refresh of a page's live part: answer that part alone."""
    return bool(request.headers.get("HX-Request"))


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int, path: str) -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="strict",
                        secure=ui_state(request).secure_cookies)


# -- sign in and out -------------------------------------------------------------------------------


def _login_page(request: Request, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(24)
    response = page(request, "login.html", None, status_code=status_code, error=error, login_csrf=nonce)
    # Double-submit: the form's hidden field must match this cookie, which another site's page can
    # neither read nor (SameSite=Strict) make the browser send, so it cannot sign a victim in.
    _set_cookie(response, request, LOGIN_COOKIE, nonce, 600, LOGIN)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return _login_page(request)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await _form(request)
    sent, expected = form.get("login_csrf"), request.cookies.get(LOGIN_COOKIE)
    if not expected or not sent or not secrets.compare_digest(sent, expected):
        return _login_page(request, "The sign-in form expired or came from another site: sign in again.", 403)
    token = form.get("token", "").strip()
    with state(request).sessions() as db:
        who = tenants.authenticate(db, token)
    if who is None:
        # Never the token itself, in the page or the log.
        return _login_page(request, "That token is not valid: it is unknown, malformed or revoked.", 401)
    cookie, s = ui_state(request).signer.issue(who.token_prefix)
    log.info("dashboard sign-in: tenant %s, token %s%s", who.tenant, who.token_prefix,
             " (operator)" if who.operator else "")
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    _set_cookie(response, request, COOKIE, cookie, max(1, s.expires - int(time.time())), PREFIX)
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN)
    return response


@router.post("/logout")
async def logout(request: Request, v: Signed) -> Response:
    if not csrf_ok(v.session, (await _form(request)).get("csrf")):
        return page(request, "error.html", v, 403, code=403, message="The form did not carry this session's "
                    "CSRF token: reload the page and try again.")
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


# -- overview --------------------------------------------------------------------------------------


def _overview(request: Request, v: Viewer) -> data.Overview:
    api = state(request)
    if api.broker is None or api.limiter is None:
        raise BrokerDown("the overview reads the queues in Redis: point BROKER_URL at the workers' Redis")
    try:
        with api.sessions() as db:
            return data.overview(db, api.broker, api.models, api.limiter, scope=v.who.scope)
    except redis.RedisError as exc:
        raise BrokerDown(f"the broker is unreachable ({type(exc).__name__})") from None


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, v: Signed) -> HTMLResponse:
    return page(request, "overview.html", v, o=_overview(request, v), hours=CHART_HOURS, models=state(request).models)


@router.get("/fragments/overview", response_class=HTMLResponse)
def overview_live(request: Request, v: Signed) -> HTMLResponse:
    return page(request, "overview_live.html", v, o=_overview(request, v), models=state(request).models)


def _step(since: datetime, now: datetime) -> int:
    """Bucket width over a batch's life: about 60 buckets, in whole minutes (the rollups' grain)."""
    return max(60, int((now - since).total_seconds() / 60) // 60 * 60)


@router.get("/data/series")
def series(request: Request, v: Signed, what: str = "throughput", batch: int | None = None) -> JSONResponse:
    """A chart's data: jobs finished or cost per tier, over the last CHART_HOURS, or over a batch's life."""
    api = state(request)
    now = utcnow()
    with api.sessions() as db:
        if batch is not None:
            history.find_batch(db_session=db, batch=batch, tenant_id=v.who.scope)  # NotFound when not visible
            since = min(data.batch_since(db, batch), now - timedelta(minutes=10))
        else:
            since = now - timedelta(hours=CHART_HOURS)
        step = _step(since, now) if batch is not None else 300
        fn = data.cost_series if what == "cost" else data.throughput_series
        s = fn(db, api.models, scope=v.who.scope, since=since, step_s=step, batch_id=batch, now=now)
    return JSONResponse(s.as_json(list(api.models.tiers)))


# -- batches ---------------------------------------------------------------------------------------


@router.get("/batches", response_class=HTMLResponse)
def batches(request: Request, v: Signed) -> HTMLResponse:
    with state(request).sessions() as db:
        rows = data.batches(db, scope=v.who.scope)
    return page(request, "_batch_rows.html" if _htmx(request) else "batches.html", v, rows=rows)


def _batch(request: Request, v: Viewer, batch_id: int) -> data.BatchPage:
    with state(request).sessions() as db:
        return data.batch(db, state(request).models, batch_id, scope=v.who.scope)


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch(request: Request, v: Signed, batch_id: int) -> HTMLResponse:
    b = _batch(request, v, batch_id)
    return page(request, "_batch_live.html" if _htmx(request) else "batch.html", v, b=b,
                cancelled=request.query_params.get("cancelled"))


@router.get("/batches/{batch_id}/cancel", response_class=HTMLResponse)
def cancel_confirm(request: Request, v: Signed, batch_id: int) -> HTMLResponse:
    b = _batch(request, v, batch_id)
    return page(request, "cancel.html", v, b=b)


@router.post("/batches/{batch_id}/cancel")
async def cancel(request: Request, v: Signed, batch_id: int) -> Response:
    form = await _form(request)
    if not csrf_ok(v.session, form.get("csrf")):
        return page(request, "error.html", v, 403, code=403, message="The form did not carry this session's "
                    "CSRF token: nothing was cancelled. Open the batch again and use its Cancel button.")
    api: ApiState = state(request)
    with api.sessions() as db:
        result = history.cancel_batch(db_session=db, batch=batch_id, tenant_id=v.who.scope)
    log.info("dashboard: tenant %s cancelled batch %d: %d job(s)", v.who.tenant, batch_id, result.cancelled)
    return RedirectResponse(f"{PREFIX}/batches/{batch_id}?{urlencode({'cancelled': result.cancelled})}",
                            status_code=303)


# -- jobs ------------------------------------------------------------------------------------------


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, v: Signed, job_id: int) -> HTMLResponse:
    with state(request).sessions() as db:
        story = history.get_job(db_session=db, job_id=job_id, tenant_id=v.who.scope)
    items = moments(story)
    start = items[0].at if items else story.job.created_at
    total, by_tier = lanes(story, start, items)
    return page(request, "job.html", v, story=story, moments=items, start=start, total=total, lanes=by_tier)


def _limit(text: str | None) -> int:
    if not text:
        return PAGE
    n = history.parse_id(text)  # a whole number, or None; list_jobs checks its range in one sentence
    if n is None:
        raise InvalidQuery(f"limit must be a whole number, not {text!r}")
    return n


SEARCH_FIELDS = ("batch", "tier", "kind", "since", "until", "key_prefix")


@router.get("/jobs", response_class=HTMLResponse)
def search(request: Request, v: Signed) -> HTMLResponse:
    """`jobs list` in the browser: the same filters, checked by the same code, and keyset paging."""
    q = request.query_params
    values = {k: q.get(k, "").strip() for k in SEARCH_FIELDS}
    statuses = [s for s in q.getlist("status") if s]
    params = [(k, val) for k, val in values.items() if val] + [("status", s) for s in statuses]
    if q.get("limit"):
        params.append(("limit", q["limit"]))
    context: dict[str, Any] = {"values": values, "statuses": statuses, "jobs": [], "next_url": None,
                               "first_url": f"{PREFIX}/jobs?{urlencode(params)}" if q.get("cursor") else None}
    try:
        filters = history.JobFilters.read(
            batch=values["batch"] or None, status=statuses, tier=values["tier"] or None,
            kind=values["kind"] or None, since=values["since"] or None, until=values["until"] or None,
            key_prefix=values["key_prefix"] or None, tenant_id=v.who.scope)
        with state(request).sessions() as db:
            result = history.list_jobs(db_session=db, filters=filters, limit=_limit(q.get("limit")),
                                       cursor=q.get("cursor") or None)
    except SwitchyardError as exc:
        # The filters stay in the form, with the one sentence saying which is wrong.
        return page(request, "search.html", v, status_for(type(exc)), error=str(exc), **context)
    if result.next_cursor:
        context["next_url"] = f"{PREFIX}/jobs?{urlencode([*params, ('cursor', result.next_cursor)])}"
    return page(request, "search.html", v, **{**context, "jobs": result.jobs})

