"""No secret in a log line, an answer or a database row: not API tokens, not ANTHROPIC_API_KEY,
not a password in DATABASE_URL."""

from __future__ import annotations

import subprocess
import time

import httpx2 as httpx
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import Base
from tests.api.conftest import FAKE_API_KEY, MakeToken, Server, free_port, job, server_env
from tests.cluster import SWITCHYARD


def _exercise(server: Server, token: str, revoked: str) -> list[str]:
    """Requests of every kind, good and bad; returns everything the server answered."""
    seen: list[str] = []
    with server.client(token) as c, server.client(revoked) as r, server.client(token + "x") as bad:
        answers = [
            c.post("/v1/batches", params={"name": "s"}, json=[job(0), job(1)]),
            c.post("/v1/batches", params={"name": "s"}, json=[job(0), {"kind": "nope"}]),
            c.post("/v1/batches", params={"name": "s"}, content=b"[{", headers={"Content-Type": "application/json"}),
            c.post("/v1/jobs", params={"batch": "s"}, content=b"\xff"),
            c.get("/v1/jobs", params={"cursor": "bad", "status": "x"}),
            c.get("/v1/jobs/999999999"),
            c.get("/v1/batches"),
            c.get("/v1/queue"),
            c.get("/metrics"),
            c.get("/openapi.json"),
            r.get("/v1/jobs"),
            bad.get("/v1/jobs"),
            httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": token}),  # no "Bearer"
        ]
    for a in answers:
        seen.append(a.text)
        seen.append(repr(dict(a.headers)))
    return seen


def test_no_secret_in_answers_logs_or_rows(server: Server, make_token: MakeToken, api_sessions: sessionmaker[Session],
                                           tenant_name: str) -> None:
    token = make_token(tenant_name)
    revoked = make_token(tenant_name)
    assert server.cli("tokens", "revoke", revoked.split("_")[1], "--tenant", tenant_name).returncode == 0
    answers = _exercise(server, token, revoked)
    listed = server.cli("tokens", "list", "--json").stdout

    secrets = {"token": token, "token secret": token.split("_", 2)[2], "revoked token secret": revoked.split("_", 2)[2],
               "ANTHROPIC_API_KEY": FAKE_API_KEY}
    time.sleep(0.5)  # let the server flush its log
    logs = server.logs()
    assert "POST /v1/batches?name=s" in logs  # the log is the server's, and it logged these requests
    with api_sessions() as s:
        rows = "\n".join(str(v) for t in Base.metadata.sorted_tables
                         for v in s.execute(text(f"SELECT t::text FROM {t.name} t")).scalars())
    assert tenant_name in rows
    for what, secret in secrets.items():
        for where, haystack in (("an answer", "\n".join(answers)), ("the server log", logs),
                                ("a database row", rows), ("tokens list", listed)):
            assert secret not in haystack, f"the {what} appears in {where}"


def test_database_password_stays_out_of_answers_and_logs(broker_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With Postgres unreachable the API says so, without the URL or its password."""
    password = "pg-pass-DO-NOT-LEAK-77"
    port = free_port()
    env = server_env(f"postgresql://switchyard:{password}@127.0.0.1:1/nowhere", broker_url)
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        popen = subprocess.Popen([SWITCHYARD, "serve", "--port", str(port), "--log-level", "debug"], stdout=fh,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/healthz", timeout=10)
                break
            except httpx.TransportError:
                assert popen.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        jobs = httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer sy_0123456789ab_" + "A" * 43},
                         timeout=10)
    finally:
        popen.terminate()
        popen.wait(10)
    assert health.status_code == 503
    assert health.json()["postgres"].startswith("unreachable")
    assert health.json()["broker"] == "ok"
    assert jobs.status_code == 503
    assert jobs.json() == {"detail": "the database is unavailable; try again shortly"}
    for haystack in (health.text, jobs.text, log.read_text(errors="replace")):
        assert password not in haystack
        assert FAKE_API_KEY not in haystack
    # The server says where it connects, with the password masked.
    assert "database postgresql://switchyard:***@127.0.0.1:1/nowhere" in log.read_text(errors="replace")
