"""Where the time goes: CPU seconds per process, and py-spy profiles of the worker processes.

``--profile`` on a benchmark attaches ``py-spy record`` to each process it starts and writes the
collapsed stacks to bench/results/profiles/; ``summarise`` turns one into the functions that hold
the most samples, inclusive and exclusive. py-spy is not a dependency: ``pip install py-spy``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

from bench.env import Proc
from bench.report import RESULTS_DIR

PROFILES = RESULTS_DIR / "profiles"
CLK_TCK = 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_pids(engine: object, database: str) -> list[int]:
    """The server processes serving one database (its pooled connections)."""
    with engine.connect() as conn:  # type: ignore[attr-defined]
        return [r[0] for r in conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                                           {"d": database})]


class CpuMeter:
    """CPU seconds used by named groups of processes between ``start`` and ``stop``. A group is a
    function returning its pids, asked again at the end: a process that appeared during the
    measurement (a new Postgres backend) counts with all its CPU."""

    def __init__(self) -> None:
        self.groups: dict[str, Callable[[], list[int]]] = {}
        self._before: dict[int, float] = {}
        self.used: defaultdict[str, float] = defaultdict(float)  # CPU seconds: a Counter holds ints

    def add(self, name: str, pids: Callable[[], list[int]]) -> None:
        self.groups[name] = pids

    def start(self) -> None:
        self._before = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids()}

    def stop(self) -> dict[str, float]:
        for name, pids in self.groups.items():
            self.used[name] += sum(max(0.0, cpu_seconds(p) - self._before.get(p, 0.0)) for p in pids())
        return dict(self.used)


class Recorder:
    """py-spy attached to processes for the length of a measurement."""

    def __init__(self, label: str) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.exe = exe
        self.dir = PROFILES / label
        self.dir.mkdir(parents=True, exist_ok=True)
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def attach(self, proc: Proc) -> None:
        out = self.dir / f"{proc.name}.txt"
        popen = subprocess.Popen([self.exe, "record", "--pid", str(proc.pid), "--rate", "200", "--format", "raw",
                                  "--nonblocking", "--output", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running.append((popen, out))

    def stop(self) -> list[Path]:
        for popen, _ in self.running:
            popen.send_signal(signal.SIGINT)
        for popen, _ in self.running:
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
        return [out for _, out in self.running]


def summarise(path: Path, *, top: int = 25, match: str = "") -> str:
    """The functions with the most samples in one collapsed-stack file: inclusive and self."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.strip() for f in stack.split(";")]
        # Frames look like "function (path/to/file.py:123)"; drop the line so a function is one row.
        names = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in frames]
        for name in set(names):
            inclusive[name] += n
        own[names[-1]] += n
    out = [f"{path.name}: {total} samples"]
    out.append("  inclusive:")
    for name, n in inclusive.most_common(400):
        if match in name:
            out.append(f"    {100 * n / total:5.1f}%  {name}")
            if len(out) > top + 2:
                break
    out.append("  self:")
    for name, n in own.most_common(top):
        out.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


# Where a sample's time goes, by the innermost frame that belongs to one of these (first match
# from the top of the stack wins: the SDK's own JSON parsing counts as the model call).
CATEGORIES = (
    ("model call (anthropic SDK, httpx)", ("anthropic/", "httpx", "httpcore", "h11/", "pydantic")),
    ("database (SQLAlchemy, psycopg)", ("sqlalchemy/", "psycopg")),
    ("broker (Celery, kombu, redis)", ("celery/", "kombu/", "redis/", "billiard/", "vine/")),
    ("switchyard's own code", ("pipeline/", "workers/", "bench/bare")),
)


def categorise(path: Path, *, within: str = "") -> dict[str, float]:
    """Share of samples per category: the frame nearest the leaf decides. ``within``: only the
    samples whose stack has a frame naming it (a timed loop, not the imports before it)."""
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or within not in stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        label = "other (threading, logging, stdlib)"
        for frame in reversed(frames):
            hit = next((name for name, marks in CATEGORIES if any(m in frame for m in marks)), None)
            if hit:
                label = hit
                break
        counts[label] += n
    return {k: v / total for k, v in counts.most_common()} if total else {}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python -m bench.profile FILE...  (collapsed stacks, as written to {PROFILES}/)")
    for arg in sys.argv[1:]:
        try:
            shares = categorise(Path(arg))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            sys.exit(f"bench.profile: {arg}: not a readable py-spy raw profile ({exc})")
        print(f"{Path(arg).stem}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()))
