"""Prometheus metrics of the API: requests by route and status class, their latency, jobs accepted
and submissions refused by a limit; and, read at scrape time, the broker's queue depths (the same
series the workers export) and the jobs queued or in each stage.

No label carries a tenant or anything a caller typed: every label value comes from a closed set
(``METHODS`` or "other", the app's route templates or "unmatched", a status class). Requests are
counted before their token is checked, so a label taken from the request would let anyone, with
no token, add series to every scrape without bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.flow import budgets
from pipeline.queries import ops


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("switchyard_api_requests_total", "HTTP requests answered, by status class (2xx...).",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("switchyard_api_request_seconds", "Time to answer an HTTP request (until the "
                                 "first byte of a streamed body).", ["method", "route"], registry=self.registry)
        self.jobs_accepted = Counter("switchyard_api_jobs_accepted_total", "New jobs written by API submissions.",
                                     registry=self.registry)
        self.refused = Counter("switchyard_api_submissions_refused_total", "Submissions refused, by reason.",
                               ["reason"], registry=self.registry)


class LiveCollector(Collector):
    """Queue depths and unfinished jobs, read when Prometheus scrapes."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("switchyard_queue_depth", "Messages waiting in a queue (all priorities).",
                                  labels=["queue"])
        if self.api.broker is not None:
            try:
                for queue, n in ops.queue_depths(self.api.broker, self.api.queues).items():
                    depth.add_metric([queue], n)
            except redis.RedisError:
                pass
        yield depth
        jobs = GaugeMetricFamily("switchyard_jobs", "Jobs queued or in a stage, by status (every tenant's).",
                                 labels=["status"])
        try:
            with self.api.sessions() as session:
                in_flight, queued, _, _ = ops.job_counts(session)
            jobs.add_metric(["queued"], queued)
            for status, by_tier in in_flight.items():
                jobs.add_metric([status], sum(by_tier.values()))
        except SQLAlchemyError:
            pass
        yield jobs
        yield from budget_gauges(self.api.sessions)


def budget_gauges(sessions: Any) -> Iterator[GaugeMetricFamily]:
    """Budgets summed over every batch and tenant (pipeline.flow.budgets): no label at all, so no
    tenant's or batch's name reaches a series."""
    reserved = GaugeMetricFamily("switchyard_budget_reserved_usd", "USD held by the calls in flight against "
                                 "their budgets (their worst case), all budgets together.")
    calls = GaugeMetricFamily("switchyard_budget_calls_reserved", "Calls in flight holding a budget reservation.")
    paused = GaugeMetricFamily("switchyard_budget_paused_jobs", "Jobs paused because their next call did not fit "
                               "a budget.")
    exhausted = GaugeMetricFamily("switchyard_budget_exhausted_batches", "Batches with jobs paused for their budget.")
    try:
        with sessions() as session:
            seen = budgets.overview(session)
    except SQLAlchemyError:
        return
    reserved.add_metric([], float(seen.reserved_usd))
    calls.add_metric([], seen.calls_reserved)
    paused.add_metric([], seen.paused)
    exhausted.add_metric([], seen.exhausted_batches)
    yield from (reserved, calls, paused, exhausted)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_labels(scope: Scope, status: int) -> tuple[str, str, str]:
    """The method, route and status labels of a request, each from a closed set: a known method
    or "other"; the route template the app matched (``/v1/jobs/{job_id}``, never the raw path, so
    ids do not become labels) or "unmatched"; and the status class."""
    method = scope["method"] if scope["method"] in METHODS else "other"
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    return method, route, f"{min(max(status // 100, 1), 5)}xx"


class MetricsMiddleware:
    """Counts and times every request, labelled by ``request_labels``."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                method, route, status_class = request_labels(scope, message["status"])
                self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
                self.metrics.requests.labels(method, route, status_class).inc()
            await send(message)

        await self.app(scope, receive, send_wrapper)
