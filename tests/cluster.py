"""Real switchyard processes for end-to-end and fault tests: workers per tier and the dispatcher,
each started with the `switchyard` command in its own process group, so a test can SIGKILL or
SIGTERM one exactly as an operator's supervisor would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.models import TERMINAL, Job
from pipeline.queries.report import terminal_count

SWITCHYARD = str(Path(sys.executable).parent / "switchyard")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)
    ready: str | None = None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.popen.pid, sig)


@dataclass
class Cluster:
    database_url: str
    broker_url: str
    claude_url: str
    workdir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    started: int = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SWITCHYARD_"))}
        env.update({
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.broker_url,
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": self.claude_url,
            "SWITCHYARD_CALL_TIMEOUT_S": "10",
            "SWITCHYARD_DISPATCH_INTERVAL_S": "0.2",
            "SWITCHYARD_STAGE_DEADLINE_S": "60",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_extra)
        return env

    def _start(self, name: str, args: list[str], ready: str | None, timeout: float = 30.0, *,
               wait: bool = True) -> Proc:
        self.started += 1
        log = self.workdir / f"{name}-{self.started}.log"
        fh = log.open("wb")
        popen = subprocess.Popen([SWITCHYARD, *args], stdout=fh, stderr=subprocess.STDOUT, env=self.env(),
                                 start_new_session=True)
        proc = Proc(name, popen, log, args, ready)
        self.procs.append(proc)
        if wait:
            self.wait_ready([proc], timeout=timeout)
        return proc

    def wait_ready(self, procs: list[Proc], *, timeout: float = 30.0) -> None:
        """Wait until each of ``procs`` has logged its ready line."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            while proc.ready and proc.ready not in proc.log.read_text(errors="replace"):
                if not proc.alive:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} not ready after {timeout} s:\n{proc.tail()}")
                time.sleep(0.1)

    def worker(self, tier: str, *, concurrency: int = 8, extra: list[str] | None = None, wait: bool = True) -> Proc:
        return self._start(f"worker-{tier}", ["worker", "--tier", tier, "--concurrency", str(concurrency),
                                              *(extra or [])], ready=" ready.", wait=wait)

    def dispatcher(self, *, wait: bool = True) -> Proc:
        return self._start("dispatcher", ["dispatcher"], ready="dispatcher:", wait=wait)

    def start_all(self, *, concurrency: int = 8) -> None:
        # Started together, then waited for: each process spends seconds importing, and on a busy
        # machine starting them one after another took most of a fault case's time.
        procs = [self.worker(tier, concurrency=concurrency, wait=False) for tier in ("triage", "sonnet", "opus",
                                                                                       "validate")]
        procs.append(self.dispatcher(wait=False))
        try:
            self.wait_ready(procs, timeout=60)
        except BaseException:
            # One that cannot start must not leave the others running, consuming the next test's
            # messages from the same Redis database.
            self.stop()
            raise

    def restart(self, proc: Proc, *, wait_ready: bool = True) -> Proc:
        """Start ``proc`` again (after it died or was stopped), as a supervisor would."""
        if proc.alive:
            raise RuntimeError(f"{proc.name} is still running")
        proc.popen.wait()
        self.procs.remove(proc)
        return self._start(proc.name, proc.args, proc.ready if wait_ready else None)

    @contextmanager
    def supervised(self, *, interval: float = 0.2) -> Iterator[list[tuple[str, int]]]:
        """Restart any process that dies, like systemd's Restart=always; yields the list of
        (name, exit code) of each death seen."""
        deaths: list[tuple[str, int]] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(interval):
                for proc in list(self.procs):
                    code = proc.popen.poll()
                    if code is not None:
                        deaths.append((proc.name, code))
                        self.restart(proc, wait_ready=False)

        thread = threading.Thread(target=watch, name="supervisor", daemon=True)
        thread.start()
        try:
            yield deaths
        finally:
            stop.set()
            thread.join(5)

    def stop(self, timeout: float = 20.0) -> None:
        for p in self.procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                p.popen.wait(5)
        self.procs.clear()

    def logs(self) -> str:
        return "\n\n".join(f"== {p.name} ==\n{p.tail()}" for p in self.procs)


def wait_for_batch(sessions: sessionmaker[Session], batch_id: int, *, timeout: float,
                   cluster: Cluster | None = None, check: Callable[[], None] | None = None) -> None:
    """Poll Postgres until every job of the batch is terminal."""
    deadline = time.monotonic() + timeout
    done = total = 0
    while time.monotonic() < deadline:
        with sessions() as s:
            done, total = terminal_count(s, batch_id=batch_id)
        if total and done == total:
            return
        if check:
            check()
        time.sleep(0.25)
    detail = cluster.logs() if cluster else ""
    with sessions() as s:
        stuck = s.execute(select(Job.id, Job.key, Job.status, Job.tier, Job.deliveries, Job.claimed_at,
                                 Job.stage_started_at)
                          .where(Job.batch_id == batch_id, Job.status.not_in(list(TERMINAL))).limit(5)).all()
    raise AssertionError(f"batch {batch_id}: only {done}/{total} jobs terminal after {timeout} s; "
                         f"some not terminal: {[tuple(r) for r in stuck]}\n{detail}")
