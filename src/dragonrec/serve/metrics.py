"""Prometheus metrics of one app: request latency and errors by route, events ingested, recommendations, and
the serving state (active model version, loads, catalog size) read from the service at scrape time.

Each app has its own `CollectorRegistry`, so several apps in one process (tests) never share counters.

Several worker processes (`dragonrec serve --workers N`) share their counters and histograms through
prometheus_client's multiprocess mode: the command points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before the
workers start, each worker writes its values there, and /metrics, whichever worker answers it, sums them over all
workers (`MultiProcessCollector`). The serving state (model version, loads, catalog size) is the answering
worker's.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set (by `dragonrec serve --workers N`) before prometheus_client loads
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The app's metrics; `render()` is the /metrics body."""

    def __init__(self, service=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("dragonrec_request_seconds", "HTTP request latency by route",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("dragonrec_request_errors", "HTTP responses with a 4xx or 5xx status",
                              ["method", "route", "status"], registry=r)
        self.events = Counter("dragonrec_events_ingested", "Events newly stored, by action and route",
                              ["action", "route"], registry=r)
        self.duplicates = Counter("dragonrec_events_duplicate", "Events already stored (retries)", registry=r)
        self.stages = Histogram("dragonrec_recommend_stage_seconds",
                                "Time of a recommend request's stages: the history read, the pipeline (candidates, "
                                "scoring, re-rank; waiting for a shared batch included) and the impression's write",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.recommendations = Counter("dragonrec_recommendations", "Lists served, by model version and cold start",
                                       ["model_version", "cold"], registry=r)
        self._state = _ServiceCollector(service) if service is not None else None
        if self._state is not None:
            r.register(self._state)

    def render(self) -> bytes:
        """The exposition text: this app's registry, or with several worker processes (PROMETHEUS_MULTIPROC_DIR
        set), the sum over every worker's values plus this worker's serving state."""
        shared = os.environ.get(MULTIPROC_ENV)
        if not shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=shared)
        if self._state is not None:
            registry.register(self._state)
        return generate_latest(registry)


class _ServiceCollector:
    """Serving state at scrape time: the version that serves (info-style gauge), loads, catalog size."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        s = self.service
        if s._serving is None:
            return
        info = GaugeMetricFamily("dragonrec_model_version_info", "The model version serving requests (value 1)",
                                 labels=["version"])
        info.add_metric([s.model_version], 1.0)
        yield info
        loading = GaugeMetricFamily("dragonrec_model_loading", "1 while a model version loads in the background")
        loading.add_metric([], 1.0 if s._loading else 0.0)
        yield loading
        loads = CounterMetricFamily("dragonrec_model_loads", "Model version loads by outcome", labels=["outcome"])
        for outcome in ("ok", "failed"):
            loads.add_metric([outcome], float(s.load_counts[outcome]))
        yield loads
        items = GaugeMetricFamily("dragonrec_catalog_items", "Live products in the catalog")
        items.add_metric([], float(s.serving.state.live.sum()))
        yield items


class MetricsMiddleware:
    """Times every HTTP request and counts error responses, labelled by the route's path template."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            labels = (scope["method"], route, str(status))
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - t0)
            if status >= 400:
                self.metrics.errors.labels(*labels).inc()
