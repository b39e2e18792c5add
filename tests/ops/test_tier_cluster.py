"""Per-tier operation on real worker processes: two sonnet workers share one rate limit, a 429
pauses the whole tier, and `switchyard status` sees the queues and the workers.

Everything is counted at the fake Claude, from its own log of request timestamps: what reached the
API is what the limits are about. The limits run on a 1 s window (SWITCHYARD_RATE_WINDOW_S) so the
test takes seconds, not minutes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.claude.ratelimit import RedisRateLimiter
from pipeline.config import ModelConfig
from pipeline.fake_claude import FakeClaude, FakeOptions
from pipeline.intake.enqueue import enqueue_file
from pipeline.models import Job, JobStatus, ModelCall
from tests.cluster import SWITCHYARD, Cluster, wait_for_batch

pytestmark = pytest.mark.e2e

RPM = 5  # sonnet requests per window...
WINDOW_S = 1.0  # ...of one second
RETRY_AFTER_S = 2.0
# Between a worker's turn and its request's arrival at the fake lie an HTTP round trip and thread
# scheduling. A window of the fake's log may therefore hold requests admitted up to this much
# before it; generous, because it only ever loosens the bound.
ARRIVAL_SLACK_S = 0.5


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeClaude]:
    with FakeClaude(port=0, options=FakeOptions(latency_ms=20, retry_after_s=RETRY_AFTER_S)) as f:
        yield f


@pytest.fixture(scope="module")
def cluster(database_url: str, broker_url: str, fake: FakeClaude,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    client = redis.Redis.from_url(broker_url)
    for tier in ("haiku", "sonnet", "opus"):
        client.delete(*RedisRateLimiter.keys(tier))
    c = Cluster(database_url=database_url, broker_url=broker_url, claude_url=fake.base_url,
                workdir=tmp_path_factory.mktemp("tiers"),
                env_extra={"SWITCHYARD_RATE_LIMITS": f"sonnet.rpm={RPM}",
                           "SWITCHYARD_RATE_WINDOW_S": str(WINDOW_S)})
    try:
        for _ in range(2):
            c.worker("sonnet", concurrency=4, extra=["--metrics-port", str(free_port())])
        c.worker("validate", concurrency=4)
        c.dispatcher()
        yield c
    finally:
        c.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_ports(cluster: Cluster) -> list[int]:
    return [int(p.popen.args[p.popen.args.index("--metrics-port") + 1])  # type: ignore[union-attr]
            for p in cluster.procs if "--metrics-port" in p.popen.args]  # type: ignore[operator]


def scrape(ports: list[int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every port's /metrics, summed over the ports."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                out[key] = out.get(key, 0.0) + sample.value
    return out


def enqueue_pinned(sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path, name: str,
                   texts: list[str]) -> int:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"key": f"{name}-{i}", "kind": "classify", "text": t, "tier": "sonnet",
                                        "labels": ["billing", "other"]}) + "\n" for i, t in enumerate(texts)))
    report = enqueue_file(sessions, path, batch=name, config=models)
    assert report.batch_id is not None
    return report.batch_id


def sonnet_requests(fake: FakeClaude) -> list[dict]:
    return sorted((r for r in fake.requests() if r["model"] and "sonnet" in r["model"]),
                  key=lambda r: r["started_at"])


def received(cluster: Cluster, tier: str) -> list[int]:
    """Tasks each worker of ``tier`` has received so far, from its log."""
    return [len(re.findall(r"Task switchyard\.work\[[^\]]+\] received", p.log.read_text(errors="replace")))
            for p in cluster.procs if p.name == f"worker-{tier}"]


def test_two_workers_of_a_tier_stay_within_its_one_limit(
    cluster: Cluster, fake: FakeClaude, sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
) -> None:
    fake.reset()
    n = 30
    batch = enqueue_pinned(sessions, models, tmp_path, "limit", [f"Ticket {i}: charged twice" for i in range(n)])
    wait_for_batch(sessions, batch, timeout=120, cluster=cluster)

    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)
                        .where(Job.batch_id == batch, Job.status == JobStatus.SUCCEEDED)) == n
    starts = [r["started_at"] for r in sonnet_requests(fake)]
    assert len(starts) == n
    assert all(r["status"] == 200 for r in fake.requests())
    # Both workers took part: the limit held across processes, not inside one.
    assert all(k > 0 for k in received(cluster, "sonnet")), received(cluster, "sonnet")
    # A token bucket of RPM per WINDOW_S (burst RPM) admits at most RPM + RPM * T / WINDOW_S in any
    # span of T seconds. Check every window of the fake's log that starts at a request.
    bound = RPM + RPM * (WINDOW_S + ARRIVAL_SLACK_S) / WINDOW_S
    busiest = max(sum(1 for t in starts if s0 <= t < s0 + WINDOW_S) for s0 in starts)
    assert busiest <= bound, f"{busiest} sonnet requests within {WINDOW_S} s; the tier allows {bound:.0f}"
    # And the whole run took as long as the budget makes it: n requests less the burst, at RPM a window.
    assert starts[-1] - starts[0] >= (n - RPM) * WINDOW_S / RPM - ARRIVAL_SLACK_S


def test_a_429_with_retry_after_pauses_the_whole_tier(
    cluster: Cluster, fake: FakeClaude, sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
) -> None:
    fake.reset()
    before = received(cluster, "sonnet")
    # One job meets a 429 (once); only when the fake has answered it do the others arrive, so every
    # later sonnet request was sent after the tier was paused, from whichever worker.
    first = enqueue_pinned(sessions, models, tmp_path, "pause-first",
                           ["Charged twice [fake:error=429@sonnet] [fake:times=1]"])
    deadline = time.monotonic() + 60
    while not any(r["status"] == 429 for r in fake.requests()):
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.05)
    rest = enqueue_pinned(sessions, models, tmp_path, "pause-rest", [f"Ticket {i}: refund" for i in range(8)])
    wait_for_batch(sessions, first, timeout=120, cluster=cluster)
    wait_for_batch(sessions, rest, timeout=120, cluster=cluster)

    log = sonnet_requests(fake)
    (hit,) = [r for r in log if r["status"] == 429]
    after = [r for r in log if r["started_at"] > hit["started_at"]]
    assert len(after) == 9  # the 429'd job's retry and the eight others
    early = [r for r in after if r["started_at"] < hit["started_at"] + RETRY_AFTER_S]
    assert early == [], f"{len(early)} sonnet request(s) inside the {RETRY_AFTER_S} s pause"
    # The eight were spread over both workers, so the pause held for a worker that never saw the 429.
    now = received(cluster, "sonnet")
    assert all(b > a for a, b in zip(before, now, strict=True)), (before, now)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id.in_([first, rest]), Job.status == JobStatus.SUCCEEDED)) == 9


def test_status_json_reports_queues_workers_and_throughput(
    cluster: Cluster, sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
) -> None:
    batch = enqueue_pinned(sessions, models, tmp_path, "status", [f"Ticket {i}" for i in range(3)])
    wait_for_batch(sessions, batch, timeout=120, cluster=cluster)
    with sessions() as s:
        finished = s.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.SUCCEEDED, Job.finished_at >= func.now() - timedelta(minutes=4)))
    out = subprocess.run([SWITCHYARD, "status", "--json"], env=cluster.env(), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    queues = {q["queue"]: q for q in st["queues"]}
    assert set(queues) == {"triage", "sonnet", "opus", "validate"}
    assert (queues["sonnet"]["workers"], queues["sonnet"]["concurrency"]) == (2, 8)
    assert (queues["validate"]["workers"], queues["validate"]["concurrency"]) == (1, 4)
    assert queues["triage"]["workers"] == queues["opus"]["workers"] == 0
    assert all(q["depth"] == 0 for q in st["queues"]), st["queues"]  # every batch above has finished
    pids = {w["pid"] for w in st["workers"]}
    assert pids == {p.popen.pid for p in cluster.procs if p.name.startswith("worker-")}
    assert st["finished_5m"].get("succeeded", 0) >= finished >= 3
    assert st["limits"]["sonnet"]["rpm"] == RPM


def test_worker_metrics_count_calls_tokens_cost_stages_and_waits(
    cluster: Cluster, fake: FakeClaude, sessions: sessionmaker[Session], models: ModelConfig, tmp_path: Path,
) -> None:
    ports = metrics_ports(cluster)
    assert len(ports) == 2
    before = scrape(ports)
    fake.reset()
    n = 10
    batch = enqueue_pinned(sessions, models, tmp_path, "metrics", [f"Invoice {i} unpaid" for i in range(n)])
    wait_for_batch(sessions, batch, timeout=120, cluster=cluster)
    # The heartbeat thread refreshes the queue-depth gauge every 5 s, so a scrape can still show a
    # sample taken while the batch was queued: wait for one taken after it drained.
    depth = ("switchyard_queue_depth", (("queue", "sonnet"),))
    deadline = time.monotonic() + 30
    while (after := scrape(ports)).get(depth) != 0:
        assert time.monotonic() < deadline, f"sonnet queue depth still {after.get(depth)} with the batch done"
        time.sleep(0.5)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    log = sonnet_requests(fake)
    assert delta("switchyard_calls_total", tier="sonnet", outcome="ok") == n == len(log)
    assert delta("switchyard_tokens_total", tier="sonnet", direction="output") == sum(r["output_tokens"] for r in log)
    assert delta("switchyard_call_latency_seconds_count", tier="sonnet") == n
    # The work stage applies a classify answer's label check itself, so each job's run ends it
    # (outcome "ended") instead of handing it to the validate queue. At least n: a duplicate
    # message finds its job already claimed and ends too (run alone, this test meets the
    # dispatcher's start-up republish on a fresh broker).
    assert delta("switchyard_stage_runs_total", queue="sonnet", stage="work", outcome="ended") >= n
    assert delta("switchyard_stage_runs_total", queue="sonnet", stage="work", outcome="handoff") == 0
    with sessions() as s:
        cost = s.scalar(select(func.sum(ModelCall.cost_usd)).join(Job).where(Job.batch_id == batch))
    assert delta("switchyard_cost_usd_total", tier="sonnet") == pytest.approx(float(cost), rel=1e-6)
    # Ten calls arriving together against a burst of five: some waited for their turn.
    assert delta("switchyard_rate_limit_wait_seconds_count", tier="sonnet") > 0
