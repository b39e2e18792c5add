"""The HTTP API for real: `switchyard serve` in a subprocess on a free port, on the test database
and broker, and an HTTP client (httpx2, the HTTP library the anthropic SDK ships with) talking to
it over TCP. Its log is kept, so tests can check what it wrote."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.db import transaction
from tests.cluster import SWITCHYARD

# Never a real key: the tests check that it appears in no log line, answer or row.
FAKE_API_KEY = "sk-ant-test-DO-NOT-LEAK-3b9f2c7e"
MAX_BODY_BYTES = 256 * 1024
MAX_BATCH_JOBS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    log: Path
    popen: subprocess.Popen[bytes]
    env: dict[str, str]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SWITCHYARD, *args], env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)


def server_env(database_url: str, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SWITCHYARD_"))}
    env.update({
        "DATABASE_URL": database_url, "BROKER_URL": broker_url, "ANTHROPIC_API_KEY": FAKE_API_KEY,
        "SWITCHYARD_API_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "SWITCHYARD_API_MAX_BATCH_JOBS": str(MAX_BATCH_JOBS),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="session")
def server(database_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "serve.log"
    env = server_env(database_url, broker_url)
    with log.open("wb") as fh:
        # Debug logging: the secrets test should see everything the server could say.
        popen = subprocess.Popen([SWITCHYARD, "serve", "--port", str(port), "--log-level", "debug"], stdout=fh,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(url=f"http://127.0.0.1:{port}", log=log, popen=popen, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{srv.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"switchyard serve did not start:\n{srv.logs()[-3000:]}")
        time.sleep(0.1)
    yield srv
    popen.terminate()
    try:
        popen.wait(10)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(5)


MakeToken = Callable[[str], str]


@pytest.fixture(scope="session")
def make_token(sessions: sessionmaker[Session]) -> MakeToken:
    def make(tenant: str) -> str:
        with transaction(sessions) as session:
            return tenants.create_token(session, tenant).token

    return make


@pytest.fixture
def tenant_name(request: pytest.FixtureRequest) -> str:
    """A tenant of the test's own, so tests share the server without seeing each other's work."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60]
    return f"t-{readable}-{time.monotonic_ns() % 10**6}"


def job(i: int, **extra: object) -> dict[str, object]:
    return {"key": f"k-{i}", "kind": "classify", "text": f"Ticket {i}: charged twice", "labels": ["billing", "bug"],
            **extra}
