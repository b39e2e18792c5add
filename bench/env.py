"""The benchmarks' surroundings: a scratch Postgres database, the benchmark Redis database, the fake
Claude in its own process, and worker processes started the way an operator starts them.

Everything here is real: the same ``switchyard worker`` and ``switchyard dispatcher`` commands, the
same migrations, the fake over HTTP through the official SDK.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any, TypeVar

import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from pipeline import migrate

PG_SERVER = os.environ.get("SWITCHYARD_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("SWITCHYARD_BENCH_REDIS", "redis://127.0.0.1:6379")
# Benchmarks own this Redis database and flush it; tests use their own (SWITCHYARD_TEST_REDIS_DB).
REDIS_DB = int(os.environ.get("SWITCHYARD_BENCH_REDIS_DB", "7"))


def _numbers(name: str, spec: str) -> list[int]:
    """"1-6,8" -> [1, 2, 3, 4, 5, 6, 8]; a mistake stops the benchmarks with one line naming it."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            low, _, high = part.partition("-")
            out += range(int(low), int(high or low) + 1)
    except ValueError:
        raise SystemExit(f"error: {name}={spec!r}: expected Redis database numbers and ranges, "
                         f"such as 1-6,8") from None
    return out


# The Redis databases that benchmarks run side by side (``side_by_side``: the quick size's) take,
# one each: every one of the server's sixteen but 0 (a default for users), 7 (REDIS_DB) and 9-12
# (`make test`'s sessions and their benchmark smoke tests), so that a `make bench` beside a
# `make test` flushes none of its queues. Empty: such benchmarks run one after another.
LANE_DBS = _numbers("SWITCHYARD_BENCH_LANE_DBS", os.environ.get("SWITCHYARD_BENCH_LANE_DBS", "1-6,8,13-15"))
# Postgres connections for each worker of a cluster whose figures are not times (given to
# switchyard_env as SWITCHYARD_DB_CONNECTIONS), where the queues' default concurrencies would ask
# for more than Postgres's max_connections (100 by default): quality's and caching's four or five
# workers at their defaults may open 16 + 32 + 32 + 16 (+ 32), and the "too many clients" errors,
# each retried, would be part of what such a run did. Side by side (the quick size), fewer still:
# five clusters share the server.
UNTIMED_DB_CONNECTIONS = 12
LANE_DB_CONNECTIONS = 4
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent  # the checkout: `celery -A bench.bare` imports from here


@contextmanager
def workdir() -> Iterator[Path]:
    """A scratch folder for one benchmark's job files and process logs. Removed when the benchmark
    ends well; kept, and named on stderr, when it fails, since the logs say why."""
    path = Path(tempfile.mkdtemp(prefix="sy-bench-"))
    try:
        yield path
    except BaseException:
        print(f"benchmark files and logs kept in {path}", file=sys.stderr)
        raise
    shutil.rmtree(path, ignore_errors=True)


def admin_engine() -> Engine:
    return create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")


_template: str | None = None
_template_lock = threading.Lock()


def _migrated_template(admin: Engine) -> str:
    """A database migrated to head once per benchmark process, that each migrated scratch database
    is copied from (CREATE DATABASE ... TEMPLATE): the same schema through the real migrations,
    without running all of them again for each of the twenty-odd measurements of a run (about
    1.5 s each). Dropped when the process exits."""
    global _template
    with _template_lock:  # benchmarks side by side must not each make one
        if _template is None:
            name = f"sy_bench_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            engine = create_engine(f"{PG_SERVER}/{name}")
            try:
                migrate.upgrade(f"{PG_SERVER}/{name}", engine=engine)
            finally:
                engine.dispose()  # a template may have no session open while it is copied

            def drop() -> None:
                with admin_engine().connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

            atexit.register(drop)
            _template = name
        return _template


@contextmanager
def scratch_database(prefix: str = "sy_bench", *, migrated: bool = True) -> Iterator[str]:
    """A new database (migrated to head with the real migrations), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = admin_engine()
    template = f' TEMPLATE "{_migrated_template(admin)}"' if migrated else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{template}'))
    url = f"{PG_SERVER}/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def checkpoint(engine: Engine) -> str | None:
    """Write every dirty page out before a timed part: otherwise the checkpointer flushes what an
    earlier part (or benchmark) wrote while this one is timed, and the figure measures the disk.
    None, or why it could not (CHECKPOINT needs a superuser or pg_checkpoint)."""
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CHECKPOINT"))
    except DBAPIError as exc:
        return str(exc.orig)
    return None


# A benchmark run by side_by_side: .lane, true; .redis_db, the Redis database it took from
# _free_dbs at its first broker_url() (a call that only runs others side by side takes none);
# .nice, its processes' niceness.
_lane = threading.local()
_free_dbs: Queue[int] = Queue()
for _db in LANE_DBS:
    _free_dbs.put(_db)


def broker_url() -> str:
    """The benchmark Redis database, emptied: a run never sees a previous run's messages. A
    benchmark run side by side with others has one of its own (``side_by_side``)."""
    if getattr(_lane, "lane", False):
        if _lane.redis_db is None:
            _lane.redis_db = _free_dbs.get()  # waits while every lane database is taken
        db = _lane.redis_db
    else:
        db = REDIS_DB
    url = f"{REDIS_SERVER}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


T = TypeVar("T")


def side_by_side(calls: Mapping[str, Callable[[], T]], *,
                 nice: Mapping[str, int] | None = None) -> Iterator[tuple[str, T, float]]:
    """Run the calls at once, each in a thread with a Redis database of its own (LANE_DBS: so that
    one's ``broker_url()`` never empties another's broker), and yield ``(name, result, seconds)``
    as each ends; one after another when LANE_DBS is empty. A call waits for a database while all
    are taken (nested calls take theirs from the same ones). ``nice``: the niceness of the
    processes a call starts, by name (default: the caller's), so that those of a call which needs
    the CPU on time come first. A call that raises, or an interrupt (Ctrl-C), stops every
    benchmark process (terminate_all), so that the others end at their next check; the first
    exception is then raised."""
    inherited = getattr(_lane, "nice", 0)

    def in_lane(call: Callable[[], T], niceness: int) -> tuple[T, float]:
        t0 = time.monotonic()
        _lane.lane, _lane.redis_db, _lane.nice = bool(LANE_DBS), None, niceness
        try:
            return call(), time.monotonic() - t0
        finally:
            if _lane.redis_db is not None:
                _free_dbs.put(_lane.redis_db)
            del _lane.lane, _lane.redis_db, _lane.nice

    with ThreadPoolExecutor(max(1, len(calls)) if LANE_DBS else 1, thread_name_prefix="bench-lane") as pool:
        pending = {pool.submit(in_lane, call, (nice or {}).get(name, inherited)): name for name, call in calls.items()}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result, seconds = future.result()
                    yield pending.pop(future), result, seconds
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the calls not begun never begin
            terminate_all()
            raise


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in this process: benchmarks side by side
    would otherwise be handed one port between asking and their fake binding it."""
    with _ports_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _ports_given:
                _ports_given.add(port)
                return port


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def pids_named(command: str) -> list[int]:
    """Processes whose command name is ``command`` (a local service: ``redis-server``)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == command:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def child_pids(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _renice_session(pid: int, niceness: int) -> None:
    """Lower the priority of a process started in a session of its own. Where the kernel groups
    the processes of each session for scheduling (autogroup, on by default), a process's own nice
    only ranks it within its session: the session's group weighs as much as any other's unless its
    own niceness is set, in /proc/PID/autogroup. Both, so that it holds either way."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, niceness)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(niceness))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


@dataclass(eq=False)
class Processes:
    """Processes started for one measurement, each in its own process group, all stopped together."""

    env: dict[str, str]
    workdir: Path  # where their logs go: see ``workdir()``
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        _every_processes.add(self)

    def start(self, name: str, argv: list[str], *, ready: str | None, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                     cwd=ROOT, start_new_session=True)
        if niceness := getattr(_lane, "nice", 0):
            _renice_session(popen.pid, niceness)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        if ready:
            deadline = time.monotonic() + timeout
            while ready not in log.read_text(errors="replace"):
                if not proc.alive:
                    raise RuntimeError(f"{name} exited with {popen.returncode}:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{proc.tail()}")
                time.sleep(0.05)
        return proc

    def check(self) -> None:
        for p in self.procs:
            if not p.alive:
                raise RuntimeError(f"{p.name} died with {p.popen.returncode}:\n{p.tail()}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.alive:
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Every Processes of this process's benchmarks, for terminate_all.
_every_processes: weakref.WeakSet[Processes] = weakref.WeakSet()


def terminate_all() -> None:
    """SIGTERM every benchmark process still running, without waiting: benchmarks side by side then
    fail at their next check (Processes.check) instead of running to their end after one of them,
    or the user's Ctrl-C, has stopped the run. Each still stops its own as it unwinds."""
    for procs in list(_every_processes):
        for p in list(procs.procs):
            if p.alive:
                with contextlib.suppress(OSError):
                    os.killpg(p.popen.pid, signal.SIGTERM)


def switchyard_env(*, database_url: str, broker: str, claude_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SWITCHYARD_"))}
    env.update({
        "DATABASE_URL": database_url,
        "BROKER_URL": broker,
        "ANTHROPIC_API_KEY": "bench-key",
        "ANTHROPIC_BASE_URL": claude_url,
        "SWITCHYARD_CALL_TIMEOUT_S": "120",
        "SWITCHYARD_DISPATCH_INTERVAL_S": "0.2",
        "SWITCHYARD_STAGE_DEADLINE_S": "600",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    if getattr(_lane, "lane", False):
        # A thread holds a connection only for a short transaction, so a few serve a worker's
        # untimed work; --db-connections, where a benchmark gives it, still wins.
        env["SWITCHYARD_DB_CONNECTIONS"] = str(LANE_DB_CONNECTIONS)
    return env


@dataclass
class Fake:
    """The fake Claude in its own process, so its CPU never shares a GIL with what is measured."""

    proc: Proc
    url: str

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/_fake/stats", timeout=10) as r:
            return json.loads(r.read())

    def requests(self) -> list[dict[str, Any]]:
        """The fake's request log: one entry per answered or failed request, with its wall-clock
        ``started_at`` and ``ended_at``."""
        with urllib.request.urlopen(self.url + "/_fake/requests", timeout=60) as r:
            data = json.loads(r.read())
        return list(data["requests"] if isinstance(data, dict) else data)

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_fake/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


def start_fake(procs: Processes, *, latency_ms: float = 0.0, args: list[str] | None = None) -> Fake:
    """``args``: more of the fake's options (``--error-rates default``...)."""
    port = free_port()
    argv = [sys.executable, "-m", "pipeline.fake_claude", "--port", str(port), "--latency-ms", str(latency_ms),
            *(args or [])]
    proc = procs.start("fake-claude", argv, ready="listening on")
    return Fake(proc, f"http://127.0.0.1:{port}")


def switchyard(*args: str) -> list[str]:
    return [str(BIN / "switchyard"), *args]


def start_worker(procs: Processes, tier: str, *, concurrency: int, loglevel: str = "INFO",
                 env: dict[str, str] | None = None) -> Proc:
    return procs.start(f"worker-{tier}", switchyard("worker", "--tier", tier, "--concurrency", str(concurrency),
                                                    "--loglevel", loglevel), ready=" ready.", env=env)


def start_dispatcher(procs: Processes, *, env: dict[str, str] | None = None) -> Proc:
    return procs.start("dispatcher", switchyard("dispatcher"), ready="dispatcher:", env=env, timeout=300)


def start_at_once(procs: Processes, commands: list[tuple[str, list[str], str]], *, env: dict[str, str] | None = None,
                  while_starting: Callable[[], None] | None = None, timeout: float = 120.0) -> list[Proc]:
    """Start every ``(name, argv, ready mark)`` at once, then wait until each has logged its mark:
    one after another, start-ups took most of a toy-sized run (four workers and a dispatcher: 14 s
    in turn, 8 s at once on two cores). ``while_starting`` runs meanwhile."""
    started = [(procs.start(name, argv, ready=None, env=env), mark) for name, argv, mark in commands]
    if while_starting is not None:
        while_starting()
    wait_until(lambda: all(mark in proc.log.read_text(errors="replace") for proc, mark in started),
               timeout=timeout, interval=0.1, procs=procs, what=f"{', '.join(c[0] for c in commands)} ready")
    return [proc for proc, _ in started]


def start_together(procs: Processes, concurrency: Mapping[str, int], *, env: dict[str, str],
                   while_starting: Callable[[], None] | None = None) -> None:
    """A worker for each queue (``concurrency``: queue -> threads) and the dispatcher, at once."""
    start_at_once(procs, [*((f"worker-{queue}", switchyard("worker", "--tier", queue, "--concurrency", str(threads),
                                                            "--loglevel", "INFO"), " ready.")
                            for queue, threads in concurrency.items()),
                          ("dispatcher", switchyard("dispatcher"), "dispatcher:")],
                  env=env, while_starting=while_starting)


def enqueue_all(sessions: Any, path: Path, *, n: int, batch: str, config: Any, **options: Any) -> int:
    """Enqueue a benchmark's jobs file as one batch and return its id; every one of its ``n`` jobs
    must be accepted, or the figures would be of another batch than the one described."""
    from pipeline.intake.enqueue import enqueue_file

    report = enqueue_file(sessions, path, batch=batch, config=config, **options)
    if report.batch_id is None or report.accepted != n:
        raise RuntimeError(f"the benchmark's jobs were not all accepted: {report}")
    return report.batch_id


def batch_ended(sessions: Any, batch_id: int, n: int) -> Callable[[], bool]:
    """The predicate for wait_until: all ``n`` jobs of the batch have ended."""
    from pipeline.queries.report import terminal_count

    def ended() -> bool:
        with sessions() as s:
            return bool(terminal_count(s, batch_id=batch_id)[0] >= n)
    return ended


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.1, procs: Processes | None = None,
               what: str = "condition") -> float:
    """Poll ``predicate`` until it is true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if procs:
            procs.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout:.0f} s")
        time.sleep(interval)
