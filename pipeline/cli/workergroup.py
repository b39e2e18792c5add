"""`switchyard worker --concurrency N` past a few hundred threads: one parent, several worker processes.

Why: a worker process's threads share one GIL. When hundreds of calls return within the same few
milliseconds (a wave, under a steady latency), one process records their results and starts the
next calls one after another, and for that long its other calls are not in flight. Past
``THREADS_PER_PROCESS`` threads, the worker command therefore starts ``ceil(N / THREADS_PER_PROCESS)``
child processes of the same command, each with its share of the threads and of the Postgres
connections, and stays as their parent:

- SIGTERM, SIGINT and SIGQUIT are forwarded to every child, so they keep Celery's meaning (warm
  shutdown with the soft-shutdown hand-back; SIGQUIT cold). The children live in process groups of
  their own, so a signal sent to the parent's group reaches each child once, through the parent.
- SIGKILL cannot be forwarded: each child asks the kernel to SIGKILL it when the parent dies
  (PR_SET_PDEATHSIG), so killing the parent is killing the worker, as with one process. Its
  claims are then recovered by the dispatcher once the children's heartbeats stop.
- A child that exits while no shutdown was asked for takes the group down: the parent sends the
  others SIGTERM (they finish or hand back their calls) and exits with the child's status, for the
  supervisor (Docker, systemd) to restart the worker whole.

Each child is a plain worker: its own heartbeat (`switchyard status` lists each), its own Celery
node name (``sonnet-2@host``), and, with ``--metrics-port P``, metrics on P + its index.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Threads per process above which the worker splits: at 200 threads one process kept 0.92 of its
# calls in flight in the in-flight benchmark, at 500 only 0.85 (README, Benchmarks).
THREADS_PER_PROCESS = 200

# Environment of a child: its index, and the pipe it reports readiness on.
CHILD_ENV = "SWITCHYARD_WORKER_CHILD"
READY_FD_ENV = "SWITCHYARD_WORKER_READY_FD"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def processes_for(concurrency: int, processes: int | None) -> int:
    """How many processes serve ``concurrency`` threads: ``processes`` if given, else enough that
    none holds more than THREADS_PER_PROCESS."""
    if processes is not None:
        return max(1, min(processes, concurrency))
    return max(1, math.ceil(concurrency / THREADS_PER_PROCESS))


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole shares, the larger first (each at least 1)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def default_db_connections(concurrency: int) -> int:
    """Postgres connections a worker of ``concurrency`` threads may open, all its processes
    together: what one process has always had (a pool of C/4, between 4 and 16, and as many again
    in overflow). A thread holds a connection only for a unit of work, never across a model call, so
    the pool is sized by how many short transactions run at once, not by the threads."""
    return 2 * min(max(concurrency // 4, 4), 16)


def db_connections(concurrency: int, flag: int | None, setting: int | None) -> int:
    """A worker's connections: ``--db-connections``, else SWITCHYARD_DB_CONNECTIONS (one value for
    every worker a host or compose file starts), else the default for its concurrency."""
    return flag or setting or default_db_connections(concurrency)


@dataclass(frozen=True)
class Child:
    index: int
    concurrency: int
    db_connections: int
    metrics_port: int | None


def plan(concurrency: int, processes: int, db_connections: int, metrics_port: int | None) -> list[Child]:
    """The children of a worker: threads and Postgres connections shared out (each child at least
    2 connections: one in the pool, one in overflow)."""
    threads = shares(concurrency, processes)
    conns = shares(max(db_connections, 2 * processes), processes)
    return [Child(i, threads[i], conns[i], metrics_port + i if metrics_port else None) for i in range(processes)]


def child_index() -> int | None:
    """This process's index in its worker group, or None when it was not started by one."""
    value = os.environ.get(CHILD_ENV)
    return int(value) if value is not None and value.isdigit() else None


def report_ready_when_celery_is() -> None:
    """In a child: write one byte to the parent's pipe once Celery's consumer is ready."""
    fd_text = os.environ.get(READY_FD_ENV)
    if not fd_text:
        return
    from celery.signals import worker_ready

    fd = int(fd_text)

    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, b"r")
            os.close(fd)


def _child_preexec(parent: int) -> None:  # pragma: no cover - runs in the forked child
    # A process group of its own: a signal to the parent's group reaches the child only through the
    # parent, once, instead of twice.
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_group(argv: Sequence[str], children: list[Child], *, tier: str, say: Any) -> int:
    """Start ``children`` (``argv``: the worker command without --concurrency, --processes and
    --metrics-port, which each child gets its own of), forward signals to them, and wait. The exit
    status is the first non-zero status of a child, else 0."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    procs: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()

    def forward(signum: int, _frame: Any) -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for c in children:
            cmd = [*argv, "--concurrency", str(c.concurrency), "--processes", "1",
                   "--db-connections", str(c.db_connections)]
            if c.metrics_port:
                cmd += ["--metrics-port", str(c.metrics_port)]
            env = {**os.environ, CHILD_ENV: str(c.index), READY_FD_ENV: str(write_fd)}
            procs.append(subprocess.Popen(cmd, env=env, pass_fds=(write_fd,),
                                          preexec_fn=lambda: _child_preexec(parent)))
        os.close(write_fd)
        threading.Thread(target=_announce_ready, args=(read_fd, children, tier, say), daemon=True).start()
        return _wait(procs, stopping, say)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce_ready(read_fd: int, children: list[Child], tier: str, say: Any) -> None:
    seen = 0
    with contextlib.suppress(OSError):
        while seen < len(children):
            chunk = os.read(read_fd, 64)
            if not chunk:  # every child closed its end: one died before it was ready
                return
            seen += len(chunk)
    os.close(read_fd)
    threads = "+".join(str(c.concurrency) for c in children)
    say(f"worker group {tier}: all {len(children)} processes ready ({threads} threads).")


def _wait(procs: list[subprocess.Popen[bytes]], stopping: threading.Event, say: Any) -> int:
    status = 0
    remaining = list(procs)
    while remaining:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
        proc = next((p for p in remaining if p.pid == pid), None)
        if proc is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        proc.returncode = code
        remaining.remove(proc)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
        if not stopping.is_set():
            # A child ended on its own: the group is no longer the worker it was started as.
            stopping.set()
            say(f"worker process {pid} exited with {code}; stopping the other {len(remaining)}")
            for p in remaining:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            if status == 0:
                status = 1
    return status
