"""Prometheus metrics of a worker or the dispatcher, for dashboards and autoscaling.

The domain library does not call Prometheus itself: the Claude client reports each attempt to an
``on_attempt`` callback and the limiter each wait to ``on_wait``; the worker's entry point installs
the functions below as those callbacks, and the stage task (workers/base.py) records stage
outcomes. One process, one registry: the worker's threads pool runs every task in the process that
serves /metrics (a prefork pool's children would not be counted; see README).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from pipeline.claude.client import Attempt
from pipeline.claude.pricing import call_cost
from pipeline.config import ModelConfig

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

CALLS = Counter("switchyard_calls_total", "HTTP attempts to the Claude API.", ["tier", "outcome"])
TOKENS = Counter("switchyard_tokens_total", "Tokens billed.", ["tier", "direction"])
COST = Counter("switchyard_cost_usd_total", "Cost of the calls, USD.", ["tier"])
CALL_LATENCY = Histogram("switchyard_call_latency_seconds", "Latency of one HTTP attempt.", ["tier"],
                         buckets=LATENCY_BUCKETS)
STAGES = Counter("switchyard_stage_runs_total", "Stage runs by queue and outcome (handoff: moved on; "
                 "ended: terminal or stale; deferred: handed back to wait for the rate limit; error).",
                 ["queue", "stage", "outcome"])
STAGE_SECONDS = Histogram("switchyard_stage_seconds", "Wall time of one stage run.", ["queue", "stage"],
                          buckets=LATENCY_BUCKETS)
RATE_WAIT = Histogram("switchyard_rate_limit_wait_seconds", "Time a call waited for its tier's budget.",
                      ["tier"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
QUEUE_DEPTH = Gauge("switchyard_queue_depth", "Messages waiting in a queue (all priorities).", ["queue"])
BUSY = Gauge("switchyard_worker_busy", "Stage runs in progress in this worker.", ["queue"])


def attempt_observer(models: ModelConfig) -> Callable[[str, str, Attempt], None]:
    def observe(tier: str, model: str, attempt: Attempt) -> None:
        outcome = "ok" if attempt.ok else (attempt.error_type or f"http_{attempt.status_code}")
        CALLS.labels(tier, outcome).inc()
        CALL_LATENCY.labels(tier).observe(attempt.latency_ms / 1000)
        if attempt.ok:
            TOKENS.labels(tier, "input").inc(attempt.usage.billed_input_tokens)
            TOKENS.labels(tier, "output").inc(attempt.usage.output_tokens)
            if tier in models.tiers:
                COST.labels(tier).inc(float(call_cost(models.tier(tier), attempt.usage, config=models)))

    return observe


def observe_wait(tier: str, seconds: float) -> None:
    RATE_WAIT.labels(tier).observe(seconds)


def set_depths(depths: dict[str, int]) -> None:
    for queue, n in depths.items():
        QUEUE_DEPTH.labels(queue).set(n)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    # Every interface: in a container the scraper comes from outside the loopback.
    start_http_server(port, addr=addr)
