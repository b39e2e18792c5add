"""The dashboard in a real browser: `switchyard serve` on a database of its own, real workers and
the dispatcher working batches against the fake Claude, and chromium (through Playwright) signing in,
opening every page, reading what they show against the database, and cancelling a batch through its
confirmation page. One server, one cluster and one browser for the whole module."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx2 as httpx
import pytest
import redis
from sqlalchemy import func, select

from pipeline import tenants
from pipeline.config import load_config
from pipeline.db import transaction
from pipeline.fake_claude import FakeClaude
from pipeline.models import EVALUATION_STAGES, Batch, Job, JobStatus, ModelCall, utcnow
from pipeline.queries import history, ops, report
from pipeline.ui.data import money
from tests.api.conftest import Server, serve
from tests.cluster import Cluster, wait_for_batch
from tests.ui.conftest import SCREENSHOTS

pytestmark = pytest.mark.e2e

SESSION_S = 3600
LIMITS = "haiku.rpm=2000,sonnet.rpm=2000,opus.rpm=2000"
LABELS = ["billing", "bug", "account", "other"]
ESCALATES = "Two lines [fake:difficulty=medium] [fake:invalid=sonnet]"


def _jobs(prefix: str, n: int, *, hint: str = "") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        extra = hint or ["", "[fake:difficulty=hard]", "[fake:invalid=sonnet]", ""][i % 4]
        out.append({"key": f"{prefix}-{i}", "kind": "classify", "text": f"Ticket {i}: charged twice {extra}",
                    "labels": LABELS})
    return out


@dataclass
class Site:
    server: Server
    cluster: Cluster
    operator: str
    alice: str
    bob: str
    alice_batch: int
    bob_batch: int
    alice_id: int

    @property
    def url(self) -> str:
        return f"{self.server.url}/ui"


def raw_calls(site: Site, *, batch_id: int | None = None, tenant_id: int | None = None,
              since: Any = None) -> dict[str, tuple[int, Decimal]]:
    """Per tier, the jobs' calls and their cost straight from model_calls (no shadow evaluation):
    what the pages' figures are checked against."""
    stmt = (select(ModelCall.tier, func.count(), func.sum(ModelCall.cost_usd)).join(Job, Job.id == ModelCall.job_id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(ModelCall.stage.not_in([s.value for s in EVALUATION_STAGES])).group_by(ModelCall.tier))
    if batch_id is not None:
        stmt = stmt.where(Job.batch_id == batch_id)
    if tenant_id is not None:
        stmt = stmt.where(Batch.tenant_id == tenant_id)
    if since is not None:
        stmt = stmt.where(ModelCall.finished_at >= since)
    with site.server.sessions() as session:
        return {tier: (int(n), Decimal(cost)) for tier, n, cost in session.execute(stmt)}


def wait_folded(sessions: Any, batch_id: int, *, timeout: float = 60) -> None:
    """Until the dispatcher has folded the batch's ended jobs and calls into the rollups (every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            left = session.scalar(select(func.count()).select_from(ModelCall).join(Job, Job.id == ModelCall.job_id)
                                  .where(Job.batch_id == batch_id, ModelCall.rolled_up.is_(False)))
        if not left:
            return
        assert time.monotonic() < deadline, f"{left} call(s) of batch {batch_id} not folded"
        time.sleep(0.25)


def _submit(server: Server, token: str, name: str, jobs: list[dict[str, Any]]) -> int:
    body = "".join(json.dumps(j) + "\n" for j in jobs).encode()
    with server.client(token) as c:
        r = c.post("/v1/batches", params={"name": name}, content=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    return int(r.json()["batch_id"])


@pytest.fixture(scope="module")
def site(fresh_database: Any, broker_url: str, fake_claude: FakeClaude,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("ui")
    database_url = fresh_database("ui")
    env = {"SWITCHYARD_UI_SECRET": "test-secret-for-the-dashboard-0123456789", "SWITCHYARD_RATE_LIMITS": LIMITS,
           "SWITCHYARD_UI_SESSION_S": str(SESSION_S)}
    # A small in-flight cap keeps the slow batch's jobs queued in Postgres, where a cancel reaches them.
    cluster = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake_claude.base_url,
                      workdir=workdir, env_extra={"SWITCHYARD_RATE_LIMITS": LIMITS, "SWITCHYARD_MAX_IN_FLIGHT": "4"})
    # The workers and the dispatcher start while the server does: each spends seconds importing.
    procs = [cluster.worker(tier, concurrency=3, wait=False) for tier in ("triage", "sonnet", "opus", "validate")]
    procs.append(cluster.dispatcher(wait=False))
    try:
        with serve(database_url, broker_url, workdir, env_extra=env) as server:
            with transaction(server.sessions) as session:
                operator = tenants.create_token(session, "operators", operator=True).token
                alice = tenants.create_token(session, "alice").token
                bob = tenants.create_token(session, "bob").token
            a = _submit(server, alice, "alice-claims", [
                *_jobs("a", 10),
                # Sonnet's answer fails its check, once and again: the job escalates to Opus.
                {"key": "esc", "kind": "generate", "prompt": ESCALATES},
                {"key": "doomed", "kind": "generate", "prompt": "nonsense [fake:invalid=all]"}])
            b = _submit(server, bob, "bob-secret", _jobs("b", 3))
            cluster.wait_ready(procs, timeout=120)
            for batch_id in (a, b):
                wait_for_batch(server.sessions, batch_id, timeout=120)
                wait_folded(server.sessions, batch_id)
            with server.sessions() as session:
                alice_id = session.scalar(select(Batch.tenant_id).where(Batch.id == a))
            yield Site(server, cluster, operator, alice, bob, a, b, int(alice_id or 0))
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def page(browser_context: Any) -> Any:
    return browser_context.pages[0] if browser_context.pages else browser_context.new_page()


def sign_in(page: Any, site: Site, token: str, *, again: bool = False) -> None:
    """Sign in with ``token``, unless the browser's session is already that token's (``again``: anyway)."""
    if not again and getattr(page, "signed_in_as", None) == token and page.context.cookies():
        return
    page.context.clear_cookies()
    page.goto(f"{site.url}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.url}/")
    page.signed_in_as = token


def shot(page: Any, name: str, *, fold: bool = False) -> None:
    """The whole page; with ``fold`` also what the window shows (the README's screenshots, in docs/)."""
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    if fold:
        page.screenshot(path=str(SCREENSHOTS / f"{name}-fold.png"))


def _tier_row(page: Any, queue: str) -> dict[str, str]:
    row = page.locator(f"[data-testid=tiers] tr[data-queue={queue}]")
    return {col: row.locator(f"[data-col={col}]").inner_text().strip() for col in ("waiting", "workers", "busy")}


# -- access ----------------------------------------------------------------------------------------


def test_sign_in_sets_a_safe_cookie_and_no_token_shows(site: Site, page: Any) -> None:
    page.context.clear_cookies()
    page.goto(f"{site.url}/")
    assert page.url == f"{site.url}/login"  # no session: to the sign-in page
    page.fill("#token", "sy_000000000000_" + "x" * 43)
    page.click("button[type=submit]")
    assert "not valid" in page.locator("[role=alert]").inner_text()
    assert not [c for c in page.context.cookies() if c["name"] == "switchyard_session"]

    before = time.time()
    sign_in(page, site, site.alice, again=True)
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "switchyard_session"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/ui"
    assert before + SESSION_S - 60 < cookie["expires"] <= time.time() + SESSION_S + 1
    secret = site.alice.split("_", 2)[2]
    assert secret not in cookie["value"] and site.alice not in page.url
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script sees it
    assert page.locator("[data-testid=who]").inner_text().startswith("alice")
    # No other site may frame a page (its buttons could be clicked through), nor run a script in it.
    answer = page.goto(f"{site.url}/batches")
    assert answer is not None and answer.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert "script-src 'self';" in answer.headers["content-security-policy"]

    # A forged or altered cookie is no session.
    forged = dict(cookie, value=cookie["value"][:-2] + ("AA" if not cookie["value"].endswith("AA") else "BB"))
    page.context.clear_cookies()
    page.context.add_cookies([forged])
    page.goto(f"{site.url}/batches")
    assert page.url == f"{site.url}/login"
    page.signed_in_as = None


def test_state_changes_need_the_sessions_csrf_token(site: Site) -> None:
    """A cross-site form post would carry the cookie at most (SameSite=Strict stops even that), never
    the session's CSRF token: refused, and nothing changes."""
    victim = _submit(site.server, site.alice, "csrf-victim", _jobs("v", 2, hint="[fake:latency_ms=1]"))
    with site.server.sessions() as session:
        # Not yet dispatched or already moving: whatever it is, the refused posts must not change it.
        before = dict(session.execute(select(Job.id, Job.status).where(Job.batch_id == victim)).all())
    with httpx.Client(base_url=site.server.url, timeout=30) as c:
        r = c.post("/ui/login", data={"token": site.alice})  # no sign-in form cookie: refused
        assert r.status_code == 403
        form = c.get("/ui/login")
        nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        r = c.post("/ui/login", data={"token": site.alice, "login_csrf": nonce})
        assert r.status_code == 303 and "switchyard_session" in c.cookies
        for data in ({}, {"csrf": "wrong"}):
            r = c.post(f"/ui/batches/{victim}/cancel", data=data)
            assert r.status_code == 403, r.text
            assert "CSRF" in r.text
        r = c.post("/ui/logout", data={})
        assert r.status_code == 403
    with site.server.sessions() as session:
        assert session.scalar(select(Batch.cancelled_at).where(Batch.id == victim)) is None
        cancelled = session.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == victim, Job.status == JobStatus.CANCELLED))
        assert cancelled == 0, before
    wait_for_batch(site.server.sessions, victim, timeout=60)
    wait_folded(site.server.sessions, victim)


# -- pages -----------------------------------------------------------------------------------------


def test_overview_shows_the_tiers_and_todays_cost(site: Site, page: Any) -> None:
    sign_in(page, site, site.alice)
    page.goto(f"{site.url}/")
    page.wait_for_selector(".chart[data-drawn]")
    broker = redis.Redis.from_url(site.cluster.broker_url)
    online = ops.workers_online(broker)
    for queue in ("triage", "sonnet", "opus", "validate"):
        row = _tier_row(page, queue)
        mine = [w for w in online if w.tier == queue]
        assert row["workers"] == str(len(mine)) and len(mine) == 1, (queue, row)
        assert row["busy"].startswith(f"{sum(w.busy for w in mine)} / 3") or row["busy"].endswith("/ 3"), row
    # Today's cost per tier: Alice's calls since midnight, as model_calls has them.
    today = raw_calls(site, tenant_id=site.alice_id, since=tenants.day_start(utcnow()))
    assert set(today) == {"haiku", "sonnet", "opus"}
    assert page.locator("[data-testid=cost-total]").inner_text() == money(sum(c for _, c in today.values()))
    for tier, (_, cost) in today.items():
        assert page.locator(f"[data-testid=cost-{tier}]").inner_text() == money(cost)
    # The saving is against the same jobs at the top tier's prices, as `stats` prices them.
    with site.server.sessions() as session:
        stats = report.summarize(session, load_config(), tenant_id=site.alice_id, since=tenants.day_start(utcnow()))
    assert page.locator("[data-testid=saving]").inner_text() == money(stats.saving)
    # Both charts drew the tiers' series (uPlot's legend names each).
    assert page.locator(".chart .u-legend").count() == 2
    assert "sonnet" in page.locator(".chart").first.inner_text()
    shot(page, "overview", fold=True)


def test_batches_list_and_batch_page_match_the_database(site: Site, page: Any) -> None:
    sign_in(page, site, site.alice)
    page.goto(f"{site.url}/batches")
    calls = raw_calls(site, batch_id=site.alice_batch)
    with site.server.sessions() as session:
        summary = history.get_batch(db_session=session, batch=site.alice_batch, tenant_id=site.alice_id)
        stats = report.summarize(session, load_config(), batch_id=site.alice_batch)
        by_status = dict(session.execute(select(Job.status, func.count()).where(Job.batch_id == site.alice_batch)
                                         .group_by(Job.status)).all())
    assert summary.by_status == {str(s.value): n for s, n in by_status.items()}
    row = page.locator(f"[data-testid=batches] tr[data-batch='{site.alice_batch}']")
    assert row.locator("[data-col=done]").inner_text() == f"{summary.done} / {summary.jobs}" == "12 / 12"
    assert row.locator("[data-col=cost]").inner_text() == money(sum(c for _, c in calls.values()))
    assert row.locator("[data-col=eta]").inner_text() == "done"
    for status, n in summary.by_status.items():
        assert row.locator(f"[data-status={status}]").inner_text() == f"{status} {n}"
    # Bob's batch is not Alice's to see.
    assert page.locator(f"tr[data-batch='{site.bob_batch}']").count() == 0
    assert "bob-secret" not in page.content()

    row.locator("a").first.click()
    page.wait_for_url(f"{site.url}/batches/{site.alice_batch}")
    page.wait_for_selector(".chart[data-drawn]")
    assert page.locator("[data-testid=batch-name]").inner_text() == "alice-claims"
    for tier, (n, cost) in calls.items():
        tr = page.locator(f"[data-testid=tier-stats] tr[data-tier={tier}]")
        assert tr.locator("[data-col=calls]").inner_text() == str(n), tier
        assert tr.locator("[data-col=cost]").inner_text() == money(cost), tier
    assert page.locator("[data-testid=stats-total]").inner_text() == money(sum(c for _, c in calls.values()))
    # The doomed job failed validation at every tier: listed with its reason.
    assert stats.failure_reasons
    reasons = page.locator("[data-testid=failure-reasons]").inner_text()
    assert stats.failure_reasons[0].reason in reasons
    failed = page.locator("[data-testid=failed-jobs] tbody tr")
    assert failed.count() == summary.by_status["failed"] == 1
    assert "No shadow evaluation" in page.locator("[data-testid=quality]").inner_text()
    shot(page, "batch")


def test_a_jobs_timeline_tells_its_story(site: Site, page: Any) -> None:
    sign_in(page, site, site.alice)
    with site.server.sessions() as session:
        job_id = history.find_job_id(db_session=session, batch="alice-claims", key="esc", tenant_id=site.alice_id)
        story = history.get_job(db_session=session, job_id=job_id, tenant_id=site.alice_id)
    page.goto(f"{site.url}/jobs/{job_id}")
    assert page.locator("[data-testid=job-status]").inner_text() == story.job.status == "succeeded"
    assert page.locator("[data-testid=job-tier]").inner_text() == story.job.tier == "opus"
    items = page.locator("[data-testid=timeline] li")
    kinds = [items.nth(i).get_attribute("data-kind") for i in range(items.count())]
    assert kinds.count("call") == len(story.calls)
    assert kinds.count("verdict") == len(story.validations)
    assert kinds.count("route") == len(story.routing)
    assert kinds.count("status") == len(story.events)
    text = page.locator("[data-testid=timeline]").inner_text()
    assert story.triage is not None
    assert f"triage verdict: {story.triage.verdict}" in text and story.triage.reason in text
    # Sonnet's answers failed their check: the failed verdicts, then the escalation, then Opus's call.
    assert text.index("escalation: sonnet → opus") < text.rindex("work call to opus")
    assert page.locator("[data-testid=timeline] li.m-verdict.bad").count() == sum(
        not v.ok for v in story.validations) >= 1
    assert json.loads(page.locator("[data-testid=output]").inner_text()) == story.output
    shot(page, "job", fold=True)


def test_search_filters_and_pages_with_the_cursor(site: Site, page: Any) -> None:
    sign_in(page, site, site.alice)
    page.goto(f"{site.url}/jobs")
    page.fill("input[name=batch]", "alice-claims")
    page.check("input[name=status][value=succeeded]")
    page.fill("input[name=limit]", "4")
    page.click("form.filters button[type=submit]")
    seen: list[int] = []
    while True:
        page.wait_for_selector("[data-testid=jobs]")
        rows = page.locator("[data-testid=jobs] tbody tr[data-job]")
        seen += [int(rows.nth(i).get_attribute("data-job") or 0) for i in range(rows.count())]
        assert rows.count() <= 4
        nxt = page.locator("[data-testid=next]")
        if nxt.count() == 0:
            break
        assert "sy_" not in (nxt.get_attribute("href") or "")
        nxt.click()
    with site.server.sessions() as session:
        expected = session.scalars(select(Job.id).where(Job.batch_id == site.alice_batch,
                                                        Job.status == JobStatus.SUCCEEDED).order_by(Job.id.desc()))
        assert seen == list(expected) and len(seen) == 11
    shot(page, "search")
    # A bad filter is one sentence on the page, not a traceback, and the form keeps what was typed.
    page.goto(f"{site.url}/jobs?since=yesterday-ish&batch=alice-claims")
    assert "since 'yesterday-ish' is not a time" in page.locator("[role=alert]").inner_text()
    assert page.input_value("input[name=batch]") == "alice-claims"


def test_cancel_a_live_batch_through_the_confirmation(site: Site, page: Any) -> None:
    sign_in(page, site, site.alice)
    # 40 jobs of two 1.5 s calls each, 4 in flight at a time: at least 30 s of work, so most are
    # still queued when the cancel comes, however slow this machine is.
    slow = _submit(site.server, site.alice, "alice-slow", _jobs("s", 40, hint="[fake:latency_ms=1500]"))
    page.goto(f"{site.url}/batches/{slow}")
    # The page follows the batch live (htmx re-fetches its figures every 5 s): its jobs per status
    # move on without a reload.
    status_line = "document.querySelector('#live p').textContent"
    shown = page.evaluate(status_line)
    page.wait_for_function(f"shown => {status_line} !== shown", arg=shown, timeout=40_000)
    page.click("text=Cancel…")
    page.wait_for_url(f"{site.url}/batches/{slow}/cancel")
    with site.server.sessions() as session:
        assert session.scalar(select(Batch.cancelled_at).where(Batch.id == slow)) is None  # asking is not doing
    page.click("[data-testid=confirm-cancel]")
    page.wait_for_url(re.compile(rf".*/ui/batches/{slow}\?cancelled=\d+$"))
    cancelled = int(page.url.rsplit("=", 1)[1])
    with site.server.sessions() as session:
        assert session.scalar(select(Batch.cancelled_at).where(Batch.id == slow)) is not None
        n = session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == slow,
                                                                       Job.status == JobStatus.CANCELLED))
        queued = session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == slow,
                                                                            Job.status == JobStatus.QUEUED))
    assert cancelled == n and n > 0 and queued == 0
    assert f"Cancelled {cancelled} job(s)" in page.locator("[data-testid=cancelled]").inner_text()
    assert "cancelled" in page.locator("#live").inner_text()
    shot(page, "cancelled")
    wait_for_batch(site.server.sessions, slow, timeout=60)


def test_a_tenant_sees_only_its_own_and_an_operator_sees_all(site: Site, page: Any) -> None:
    sign_in(page, site, site.bob)
    with site.server.sessions() as session:
        alice_job = session.scalar(select(Job.id).where(Job.batch_id == site.alice_batch).limit(1))
    for path in (f"batches/{site.alice_batch}", f"jobs/{alice_job}", f"batches/{site.alice_batch}/cancel"):
        response = page.goto(f"{site.url}/{path}")
        assert response is not None and response.status == 404, path
        assert "alice" not in page.locator("main").inner_text()
    page.goto(f"{site.url}/jobs?batch=alice-claims")
    assert "no batch" in page.locator("[role=alert]").inner_text().lower()
    page.goto(f"{site.url}/batches")
    assert page.locator("tr[data-batch]").count() == 1
    assert page.locator(f"tr[data-batch='{site.bob_batch}']").count() == 1
    # The chart data is the tenant's too: Bob's cost over Alice's batch is not his to read.
    with httpx.Client(base_url=site.server.url, cookies={c["name"]: c["value"] for c in page.context.cookies()},
                      timeout=30) as c:
        assert c.get("/ui/data/series", params={"what": "cost", "batch": site.alice_batch}).status_code == 404

    sign_in(page, site, site.operator)
    assert "operator" in page.locator("[data-testid=who]").inner_text()
    page.goto(f"{site.url}/batches")
    with site.server.sessions() as session:
        every = session.scalar(select(func.count()).select_from(Batch))
    assert page.locator("tr[data-batch]").count() == every
    assert "bob-secret" in page.content() and "alice-claims" in page.content()
    shot(page, "batches-operator")
    page.goto(f"{site.url}/jobs/{alice_job}")
    assert page.locator("[data-testid=job-id]").inner_text() == str(alice_job)


def test_a_revoked_token_ends_its_sessions_and_no_token_is_logged(site: Site, page: Any) -> None:
    with transaction(site.server.sessions) as session:
        carol = tenants.create_token(session, "carol")
    sign_in(page, site, carol.token)
    with transaction(site.server.sessions) as session:
        tenants.revoke_token(session, "carol", carol.prefix)
    page.goto(f"{site.url}/batches")
    assert page.url == f"{site.url}/login"
    page.signed_in_as = None
    log = site.server.logs()
    assert "dashboard sign-in: tenant alice" in log
    for token in (site.operator, site.alice, site.bob, carol.token):
        assert token.split("_", 2)[2] not in log

