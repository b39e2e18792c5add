"""/metrics stays the same size whatever callers send: its labels come from closed sets (known
methods, the app's route templates, status classes), never from the request. Anyone can send
requests, token or not, so a label taken from one would let anyone grow every scrape."""

from __future__ import annotations

import random
import re
import string

from tests.api.conftest import MakeToken, Server

SERIES = re.compile(r'^switchyard_api_requests_total\{method="([^"]*)",route="([^"]*)",status="([^"]*)"\}', re.M)


KNOWN = ["GET", "POST", "DELETE", "PATCH"]


def _junk_method(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=rng.randint(8, 600)))


def _paths(rng: random.Random, i: int) -> list[str]:
    return [f"/v1/jobs/{i}", "/v1/jobs", "/metrics", "/healthz",
            "/" + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 600)))]


def _send(server: Server, requests: list[tuple[str, str]]) -> None:
    with server.client() as anon:  # no token
        for method, path in requests:
            anon.request(method, path)


def test_junk_requests_leave_metrics_bounded(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    rng = random.Random(14)
    # Every kind of request below once: the closed set of series they can reach now exists.
    _send(server, [(m, p) for m in [*KNOWN, _junk_method(rng)] for p in _paths(rng, 0)])
    with server.client(make_token(tenant_name)) as c:
        c.get("/metrics")  # and a scrape's own series
        before = len(c.get("/metrics").content)
        # Then 400 more, each with a method and a path of its own.
        _send(server, [(m, rng.choice(_paths(rng, i))) for i in range(200)
                       for m in (_junk_method(rng), rng.choice(KNOWN))])
        text = c.get("/metrics").text
    # Only counts grew (a few digits per series), not the number of series.
    assert len(text) - before < 1_000, (before, len(text))

    series = SERIES.findall(text)
    assert series
    methods, routes, statuses = ({s[i] for s in series} for i in range(3))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods
    assert "unmatched" in routes
    assert all(r == "unmatched" or r.startswith(("/v1/", "/metrics", "/healthz", "/openapi.json", "/docs"))
               for r in routes), routes
    assert statuses <= {"1xx", "2xx", "3xx", "4xx", "5xx"}
