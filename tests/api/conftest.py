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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from pipeline import tenants
from pipeline.db import make_engine, session_factory, transaction
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
    database_url: str
    sessions: sessionmaker[Session]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SWITCHYARD, *args], env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)

    def make_token(self, tenant: str) -> str:
        with transaction(self.sessions) as session:
            return tenants.create_token(session, tenant).token


def server_env(database_url: str, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SWITCHYARD_"))}
    env.update({
        "DATABASE_URL": database_url, "BROKER_URL": broker_url, "ANTHROPIC_API_KEY": FAKE_API_KEY,
        "SWITCHYARD_API_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "SWITCHYARD_API_MAX_BATCH_JOBS": str(MAX_BATCH_JOBS),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@contextmanager
def serve(database_url: str, broker_url: str, workdir: Path, *,
          env_extra: dict[str, str] | None = None) -> Iterator[Server]:
    """`switchyard serve` on a free port, with debug logging (the secrets test should see
    everything the server could say), until the block ends."""
    port = free_port()
    log = workdir / "serve.log"
    env = server_env(database_url, broker_url) | (env_extra or {})
    engine = make_engine(database_url, pool_size=2)
    with log.open("wb") as fh:
        popen = subprocess.Popen([SWITCHYARD, "serve", "--port", str(port), "--log-level", "debug"], stdout=fh,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(url=f"http://127.0.0.1:{port}", log=log, popen=popen, env=env, database_url=database_url,
                 sessions=session_factory(engine))
    try:
        deadline = time.monotonic() + 60
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
    finally:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
        engine.dispose()


@pytest.fixture(scope="session")
def server(fresh_database: Callable[[str], str], broker_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server most API tests share, on a database of its own."""
    with serve(fresh_database("main"), broker_url, tmp_path_factory.mktemp("api")) as srv:
        yield srv


@pytest.fixture(scope="session")
def cluster_server(fresh_database: Callable[[str], str], broker_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on a database with nothing queued but what its test submits: for the tests that
    run workers, whose dispatcher would otherwise feed every job the other tests left queued."""
    with serve(fresh_database("cluster"), broker_url, tmp_path_factory.mktemp("api-cluster")) as srv:
        yield srv


@pytest.fixture(scope="session")
def api_sessions(server: Server) -> sessionmaker[Session]:
    return server.sessions


MakeToken = Callable[[str], str]


@pytest.fixture(scope="session")
def make_token(server: Server) -> MakeToken:
    return server.make_token


@pytest.fixture
def tenant_name(request: pytest.FixtureRequest) -> str:
    """A tenant of the test's own, so tests share the server without seeing each other's work."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60]
    return f"t-{readable}-{time.monotonic_ns() % 10**6}"


def job(i: int, **extra: object) -> dict[str, object]:
    return {"key": f"k-{i}", "kind": "classify", "text": f"Ticket {i}: charged twice", "labels": ["billing", "bug"],
            **extra}
