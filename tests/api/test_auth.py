"""Every request but the public ones (/healthz, /openapi.json, /docs) needs a valid bearer token;
tokens are stored only as hashes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Route

from pipeline.api.app import PUBLIC_PATHS, create_app
from pipeline.config import load_config
from pipeline.models import ApiToken
from pipeline.ui.routes import LOGIN
from pipeline.ui.routes import PREFIX as UI_PREFIX
from tests.api.conftest import MAX_BATCH_JOBS, MAX_BODY_BYTES, MakeToken, Server

README = Path(__file__).resolve().parents[2] / "README.md"

PROTECTED = [("GET", "/v1/jobs"), ("GET", "/v1/jobs/1"), ("GET", "/v1/batches"), ("GET", "/v1/batches/1"),
             ("POST", "/v1/batches/1/cancel"), ("GET", "/v1/batches/1/results"), ("GET", "/v1/stats"),
             ("GET", "/v1/queue"), ("GET", "/metrics"), ("POST", "/v1/jobs?batch=b"), ("POST", "/v1/batches?name=b")]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_missing_token_is_401(server: Server, method: str, path: str) -> None:
    with server.client() as c:
        r = c.request(method, path, json=[])
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["detail"]


@pytest.mark.parametrize("token", [
    "nonsense",
    "sy_0123456789ab_" + "A" * 43,  # well formed, unknown prefix
    "Basic dXNlcjpwYXNz",
])
def test_bad_token_is_401(server: Server, token: str) -> None:
    with server.client(token) as c:
        r = c.get("/v1/jobs")
    assert r.status_code == 401
    assert r.json()["detail"] == "the bearer token is not valid: it is unknown, malformed or revoked"


def test_right_prefix_wrong_secret_is_401(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    token = make_token(tenant_name)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with server.client(forged) as c:
        assert c.get("/v1/jobs").status_code == 401
    with server.client(token) as c:
        assert c.get("/v1/jobs").status_code == 200


def test_cli_token_lifecycle_and_revocation(server: Server, api_sessions: sessionmaker[Session],
                                            tenant_name: str) -> None:
    made = server.cli("tokens", "create", "--tenant", tenant_name, "--json")
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout)
    token, prefix = new["token"], new["prefix"]
    assert token.startswith(f"sy_{prefix}_")

    with server.client(token) as c:
        assert c.get("/v1/batches").status_code == 200

    # Listing shows the prefix and never the secret; the database holds only a hash.
    listed = server.cli("tokens", "list", "--tenant", tenant_name, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [t["prefix"] for t in json.loads(listed.stdout)] == [prefix]
    assert token.split("_", 2)[2] not in listed.stdout
    with api_sessions() as s:
        row = s.scalars(select(ApiToken).where(ApiToken.prefix == prefix)).one()
        assert token not in repr(row.__dict__)
        assert token.split("_", 2)[2] not in row.secret_sha256

    revoked = server.cli("tokens", "revoke", prefix, "--tenant", tenant_name, "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"]
    with server.client(token) as c:
        r = c.get("/v1/batches")
    assert r.status_code == 401
    listed = json.loads(server.cli("tokens", "list", "--tenant", tenant_name, "--json").stdout)
    assert listed[0]["revoked_at"] is not None

    # A user's mistake is one sentence, not a traceback.
    wrong = server.cli("tokens", "revoke", "000000000000", "--tenant", tenant_name)
    assert wrong.returncode == 2
    said = " ".join(wrong.stderr.split())  # rich wraps long lines
    assert "has no token with prefix '000000000000'" in said
    assert "Traceback" not in said


def test_only_the_public_paths_answer_without_a_token(server: Server) -> None:
    """The decision, pinned: the health check and the API's description (the same for every
    deployment, naming no tenant) are public; every other route of the app, whatever its method,
    answers 401 without a token. A route added later without the token dependency fails here."""
    assert set(PUBLIC_PATHS) == {"/healthz", "/openapi.json", "/docs"}
    app = create_app(database_url=server.database_url, broker_url="memory://", models=load_config(), tier_limits={},
                     rate_window_s=60, max_body_bytes=MAX_BODY_BYTES, max_batch_jobs=MAX_BATCH_JOBS)
    # Every operation the OpenAPI document describes, and every route the app itself holds
    # (where FastAPI puts its documentation pages, which the document leaves out).
    described = [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]
    own = [(method, r.path) for r in app.routes if isinstance(r, Route)
           for method in sorted(r.methods or ()) if method != "HEAD"]
    routes = sorted({(method, re.sub(r"\{[^}]+\}", "1", path)) for method, path in described + own})
    assert len(routes) >= 14, routes
    public = {path for _, path in routes} & set(PUBLIC_PATHS)
    assert public == set(PUBLIC_PATHS)  # each public path is a route of the app
    with server.client() as c:
        for method, path in routes:
            r = c.request(method, path, json=[])
            if path.startswith(f"{UI_PREFIX}/"):
                # The dashboard signs in with a session cookie, not the bearer token: only its sign-in
                # page answers without one (and its form refuses a post without the form's own cookie);
                # every other page sends the browser to it.
                expected = {("GET", LOGIN): 200, ("POST", LOGIN): 403}.get((method, path), 303)
                assert r.status_code == expected, (method, path, r.text[:200])
                if expected == 303:
                    assert r.headers["location"] == LOGIN, (method, path)
                continue
            assert r.status_code == (200 if path in PUBLIC_PATHS else 401), (method, path, r.text[:200])
        # FastAPI's other documentation pages are switched off, not left public.
        for path in ("/redoc", "/docs/oauth2-redirect"):
            assert c.get(path).status_code == 404, path
        assert c.get("/docs").headers["content-type"].startswith("text/html")
        assert c.get("/openapi.json").json()["info"]["title"] == "switchyard"


def test_readme_names_the_public_paths() -> None:
    text = README.read_text()
    section = text[text.index("## HTTP API"):]
    start = section.index("- **Tokens.**")
    tokens = section[start:section.index("needs `Authorization", start)]
    assert set(re.findall(r"`(/[a-z.]+)`", tokens)) == set(PUBLIC_PATHS), tokens


def test_healthz_needs_no_token_and_checks_both(server: Server) -> None:
    with server.client() as c:
        r = c.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "postgres": "ok", "broker": "ok"}
