"""References, cursors and ages a hostile caller can type, over HTTP: digits of other scripts, ids
past 64 bits, ages past the calendar. Each answers 404 or 422 with one sentence; none is a 500 or
the database's words."""

from __future__ import annotations

import base64

import pytest

from tests.api.conftest import MakeToken, Server, job

BIG = "99999999999999999999"  # past 2**64
NEGATIVE_BIG = "-" + BIG


def _cursor(payload: str) -> str:
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


@pytest.mark.parametrize(("method", "path", "params", "status", "said"), [
    ("GET", "/v1/jobs", {"batch": "²"}, 404, "no batch named '²'"),
    ("GET", "/v1/jobs", {"batch": "٣"}, 404, "no batch named '٣'"),
    ("GET", "/v1/jobs", {"batch": BIG}, 404, f"no batch named '{BIG}'"),
    ("GET", f"/v1/jobs/{BIG}", {}, 404, f"no job with id {BIG}"),
    ("GET", f"/v1/jobs/{NEGATIVE_BIG}", {}, 404, f"no job with id {NEGATIVE_BIG}"),
    ("GET", f"/v1/batches/{BIG}", {}, 404, f"no batch with id {BIG}"),
    ("POST", f"/v1/batches/{BIG}/cancel", {}, 404, f"no batch with id {BIG}"),
    ("GET", f"/v1/batches/{BIG}/results", {}, 404, f"no batch with id {BIG}"),
    ("GET", "/v1/stats", {"batch_id": BIG}, 404, f"no batch with id {BIG}"),
    ("GET", "/v1/jobs", {"cursor": _cursor(f"j1:{BIG}")}, 422, "is not one that `jobs list` printed"),
    ("GET", "/v1/jobs", {"since": "99999999999d"}, 422, "since '99999999999d' is too far back"),
    ("GET", "/v1/jobs", {"until": "1000000000h"}, 422, "until '1000000000h' is too far back"),
    ("GET", "/v1/stats", {"since": "99999999999d"}, 422, "since '99999999999d' is too far back"),
    ("GET", "/v1/stats", {"until": "1000000000h"}, 422, "until '1000000000h' is too far back"),
    # More digits than int() converts (4,300): too far back all the same, and zeros in front are no age.
    ("GET", "/v1/jobs", {"since": "9" * 5000 + "d"}, 422, "is too far back"),
    ("GET", "/v1/stats", {"until": "9" * 5000 + "h"}, 422, "is too far back"),
])
def test_odd_references_answer_one_sentence(server: Server, make_token: MakeToken, tenant_name: str, method: str,
                                            path: str, params: dict[str, str], status: int, said: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        r = c.request(method, path, params=params)
    assert r.status_code == status, r.text
    assert said in r.json()["detail"]
    assert "cannot be stored" not in r.text


def test_zeros_in_front_of_an_age_change_nothing(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        c.post("/v1/batches", params={"name": "aged"}, json=[job(0)])
        r = c.get("/v1/jobs", params={"since": "0" * 5000 + "1d"})
    assert r.status_code == 200, r.text
    assert [j["batch"] for j in r.json()["jobs"]] == ["aged"]


def test_a_batch_named_by_its_id_still_works(server: Server, make_token: MakeToken, tenant_name: str) -> None:
    with server.client(make_token(tenant_name)) as c:
        batch_id = c.post("/v1/batches", params={"name": "refs"}, json=[job(0)]).json()["batch_id"]
        page = c.get("/v1/jobs", params={"batch": str(batch_id)}).json()
    assert [j["batch"] for j in page["jobs"]] == ["refs"]


@pytest.mark.parametrize("param", ["since", "until", "kind", "status", "batch"])
def test_a_long_parameter_is_not_echoed_whole(server: Server, make_token: MakeToken, tenant_name: str,
                                              param: str) -> None:
    """A refusal names the value it refuses, cut short: a hostile one cannot flood the answer or
    the log that quotes it."""
    value = ("9" * 5000 + "d") if param in ("since", "until") else "x" * 5000
    with server.client(make_token(tenant_name)) as c:
        r = c.get("/v1/jobs", params={param: value if param != "batch" else "x" * 200})
    assert r.status_code in (404, 422), r.text
    assert "xxxxxxxxxx..." in r.text or "9999999999..." in r.text
    assert len(r.json()["detail"]) < 300, r.json()["detail"][:400]
