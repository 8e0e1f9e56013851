"""Prometheus metrics of one app: request latency and errors by route, events ingested, recommendations, and
the serving state (active model version, loads, catalog size) read from the service at scrape time.

Each app has its own `CollectorRegistry`, so several apps in one process (tests) never share counters.

Several worker processes (`dragonrec serve --workers N`) share their counters and histograms through
prometheus_client's multiprocess mode: the command points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before the
workers start, each worker writes its values there, and /metrics, whichever worker answers it, sums them over all
workers (`MultiProcessCollector`). The serving state (model version, loads, catalog size) differs by worker (a
rollout reaches them one by one): each worker writes its own to a small file in the same directory (at start, on
every registry watch, about every 2 s, and when it answers a scrape), and /metrics shows every live worker's,
labelled with its `pid`; a dead worker's file is dropped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set (by `dragonrec serve --workers N`) before prometheus_client loads
STATE_PREFIX = "serving-state-"  # + pid + ".json": a worker's serving state in the shared directory
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
        set), the sum over every worker's values and every live worker's serving state."""
        shared = os.environ.get(MULTIPROC_ENV)
        if not shared:
            return generate_latest(self.registry)
        self.publish_state()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=shared)
        registry.register(_WorkersStateCollector(Path(shared)))
        return generate_latest(registry)

    def publish_state(self) -> None:
        """With several workers: write this worker's serving state where every worker's /metrics reads it
        (atomically: a reader never sees half a file). A no-op in one process."""
        shared = os.environ.get(MULTIPROC_ENV)
        state = self._state.snapshot() if shared and self._state is not None else None
        if state is None:
            return
        path = Path(shared) / f"{STATE_PREFIX}{os.getpid()}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


class _ServiceCollector:
    """Serving state at scrape time: the version that serves (info-style gauge), loads, catalog size."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []

    def snapshot(self) -> dict | None:
        """The state as plain values (None before the service has started)."""
        s = self.service
        if s._serving is None:
            return None
        return {"version": s.model_version, "loading": bool(s._loading), "loads_ok": s.load_counts["ok"],
                "loads_failed": s.load_counts["failed"], "catalog_items": int(s.serving.state.live.sum())}

    def collect(self):
        state = self.snapshot()
        if state is not None:
            yield from _state_families([({}, state)])


def _state_families(states: list[tuple[dict[str, str], dict]]):
    """The serving-state metric families of (extra labels, snapshot) pairs: one series per pair."""
    keys = sorted({k for labels, _ in states for k in labels})
    info = GaugeMetricFamily("dragonrec_model_version_info", "The model version serving requests (value 1)",
                             labels=["version", *keys])
    loading = GaugeMetricFamily("dragonrec_model_loading", "1 while a model version loads in the background",
                                labels=keys)
    loads = CounterMetricFamily("dragonrec_model_loads", "Model version loads by outcome", labels=["outcome", *keys])
    items = GaugeMetricFamily("dragonrec_catalog_items", "Live products in the catalog", labels=keys)
    for labels, st in states:
        extra = [labels[k] for k in keys]
        info.add_metric([st["version"], *extra], 1.0)
        loading.add_metric(extra, 1.0 if st["loading"] else 0.0)
        loads.add_metric(["ok", *extra], float(st["loads_ok"]))
        loads.add_metric(["failed", *extra], float(st["loads_failed"]))
        items.add_metric(extra, float(st["catalog_items"]))
    return [info, loading, loads, items]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class _WorkersStateCollector:
    """Every live worker's serving state from the files in the shared directory, labelled by pid."""

    def __init__(self, shared: Path):
        self.shared = shared

    def describe(self):
        return []

    def collect(self):
        states = []
        for path in sorted(self.shared.glob(f"{STATE_PREFIX}*.json")):
            pid = path.name[len(STATE_PREFIX):-len(".json")]
            if not pid.isdigit():
                continue
            if not _alive(int(pid)):
                path.unlink(missing_ok=True)  # a worker that died (or was replaced): its state is history
                continue
            try:
                states.append(({"pid": pid}, json.loads(path.read_text())))
            except (OSError, ValueError):  # removed or being replaced meanwhile: the next scrape has it
                continue
        if states:
            yield from _state_families(states)


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
