"""The API's answer to each branch of switchyard's error tree, from the real handlers
(pipeline.api.errors.install) on a small app whose routes raise them. No request of the real API
raises a server-side error today, so this is where that answer is pinned: a 500 that tells the
caller nothing and logs the message for the operator, masked."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from pipeline.api.errors import install
from pipeline.errors import (
    AmbiguousBatch,
    BatchCancelled,
    ConfigError,
    InvalidInput,
    LimitExceeded,
    NotFound,
    SwitchyardError,
    TransientClaudeError,
)

RAISED: dict[str, SwitchyardError] = {
    "invalid": InvalidInput("--jobs-in-flight must be 0 or more"),
    "ambiguous": AmbiguousBatch("batch name 'x' is held by 2 tenants", candidates=[]),
    "cancelled": BatchCancelled("batch 'x' was cancelled"),
    "missing": NotFound("no job with id 7"),
    "limit": LimitExceeded("over the limit", retry_after_s=30),
    "config": ConfigError("DATABASE_URL='postgresql://sy:hunter2@db/sy': not a database"),
    "claude": TransientClaudeError("overloaded", status=529),
}


def _raising(error: SwitchyardError) -> Callable[[], None]:
    def endpoint() -> None:
        raise error
    return endpoint


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install(app)
    for name, error in RAISED.items():
        app.add_api_route(f"/{name}", _raising(error), methods=["GET"])
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(("name", "status"), [
    ("invalid", 422), ("ambiguous", 422), ("cancelled", 409), ("missing", 404), ("limit", 429)])
def test_what_the_caller_can_fix_answers_its_status_and_its_sentence(client: TestClient, name: str,
                                                                      status: int) -> None:
    answer = client.get(f"/{name}")
    assert answer.status_code == status
    assert answer.json()["detail"] == str(RAISED[name])


def test_a_server_side_error_answers_500_and_tells_only_the_log(client: TestClient,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="switchyard.api"):
        for name in ("config", "claude"):
            answer = client.get(f"/{name}")
            assert answer.status_code == 500
            assert answer.json() == {"detail": "internal error: the server failed to answer this request; "
                                               "it has been logged"}
    logged = caplog.text
    assert "ConfigError while answering GET /config" in logged and "not a database" in logged
    assert "hunter2" not in logged
    assert "TransientClaudeError while answering GET /claude: overloaded" in logged
