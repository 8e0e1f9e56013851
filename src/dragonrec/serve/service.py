"""The service behind the API and the storefront: catalog, feedback store, registry and the serving pipeline.

    service = Service(Settings(data_dir="../shared/data/amazon-beauty"))
    service.start()                                   # reads the dataset, opens the store, loads the active version
    resp = service.recommend(RecommendRequest(user_id="u1", n=10, context={"cart": ["B00X"]}, surface="home"))
    service.ingest([EventIn(user_id="u1", item_id=resp.items[0].item_id, action="click",
                            request_id=resp.request_id)])
    service.item("B00X"), service.search("lipstick"), service.popular(24), service.history("u1")
    service.add_item(ItemIn(...)); service.update_item(id, ItemPatch(...)); service.delete_item(id)
    service.model_version, service.models(), service.activate("v0002"), service.rollback()
    service.close()

A request reads one immutable `Serving` (catalog + pipeline + version) and never waits for a change: a new
product, an edit or another model version builds a new `Serving` off the request path (the registry is
polled by a background thread) and one reference is swapped. A load that fails keeps the old version and
is reported by `status()` (and /health).

Online adaptation: a user's history is their dataset events plus their stored events (seconds old), so the
next list already follows what they just did; items they scrolled past or removed from the cart within
`settings.demotion_window_s` are left out of their lists, and leave their history once the window passed.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import logging
import os
import threading
import time
import traceback
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, Self

import numpy as np
import pandas as pd

from dragonrec.data.catalog import Catalog
from dragonrec.data.readers import load_dataset
from dragonrec.embed import Embedder
from dragonrec.pipeline import RequestContext
from dragonrec.recommenders.base import Recommender
from dragonrec.recommenders.cooccurrence import CooccurrenceRecommender
from dragonrec.registry import Registry, RegistryError
from dragonrec.rerank import RerankConfig
from dragonrec.schema import NEGATIVE_ACTIONS, Impression
from dragonrec.serve.batching import MicroBatcher, batch_pipeline, batched
from dragonrec.serve.schemas import (
    EventIn,
    IngestResult,
    ItemIn,
    ItemPatch,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)
from dragonrec.serve.serving import (
    FALLBACK_VERSION,
    CatalogState,
    ItemExposure,
    Serving,
    append_items,
    bandit_explore,
    build_pipeline,
    catalog_row,
    edited,
    finite,
    item_dict,
    jsonable,
    load_version,
    replay_catalog_log,
    request_filters,
)
from dragonrec.serve.settings import Settings
from dragonrec.store import Store, StoreConfig, StoreError

log = logging.getLogger("dragonrec.serve")

FUTURE_SLACK_S = 24 * 3600.0  # an event timestamp further ahead than this is a client bug, not an event


class ServiceError(Exception):
    """A request the service refuses: `status` is the HTTP status the API answers with, `message` says why."""

    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Invalid(ServiceError):
    status = 422


class TooLarge(ServiceError):
    status = 413


def explore(greedy: list, ranked: list, epsilon: float, pool: int,
            rng: np.random.Generator | None = None) -> tuple[list, list[float]]:
    """Epsilon-greedy over a pool, with each slot's exact probability (for off-policy estimates).

    With probability 1 - epsilon the greedy list is shown; otherwise a uniformly random ordered n-subset of the
    pool (the greedy items, then the ranked list's next items, up to `pool` in all). Then
    P(item at slot k) = (1 - epsilon) 1[item = greedy_k] + epsilon / M, M the pool's size. A pool no larger
    than the list, or epsilon 0, is deterministic: every probability 1.
    """
    n = len(greedy)
    ids = {r.item_id for r in greedy}
    members = list(greedy) + [r for r in ranked if r.item_id not in ids][: max(pool - n, 0)]
    m = len(members)
    if epsilon <= 0 or m <= n:
        return list(greedy), [1.0] * n
    rng = rng or np.random.default_rng()
    shown = list(greedy) if rng.random() >= epsilon else [members[i] for i in rng.permutation(m)[:n]]
    props = [(1 - epsilon) * (r.item_id == g.item_id) + epsilon / m for r, g in zip(shown, greedy)]
    return shown, props


class LoopRunner(Protocol):
    """The feedback loop as the service drives it: one round per `run()`, its state in `status()`."""

    def run(self) -> Any: ...

    def status(self) -> dict: ...


class Service:
    """Catalog, store, registry and the current pipeline; every method is safe to call from many threads."""

    def __init__(self, settings: Settings, loop: LoopRunner | None = None, embedder: Embedder | None = None):
        """`loop`: the feedback loop behind /v1/loop/*; `embedder`: item text embedder (default MiniLM)."""
        if settings.explore_epsilon > 0 and settings.explore_slots > 0:
            # both at once would make a slot's probability depend on two policies: refuse rather than log wrong ones
            raise ValueError("explore_epsilon and explore_slots are two exploration policies: set one of them")
        self.settings = settings
        self.exposure = ItemExposure()  # shown slots and clicks per item, for the bandit
        self.loop = loop
        self.embedder = embedder
        self.started_at: float | None = None
        self._serving: Serving | None = None
        self._impressions: MicroBatcher | None = None  # group commit of impressions (set by start)
        self._events: MicroBatcher | None = None  # group commit of event batches (set by start)
        self._admin = threading.RLock()  # serialises changes (catalog, swaps); requests never take it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._loading: str | None = None
        self._load_error: dict | None = None
        self._failed: str | None = None  # the version whose load failed last (not retried until asked)
        self._log_size = 0  # bytes of the catalog change log last replayed (changes by other processes)
        self.load_counts: Counter = Counter()  # "ok" / "failed" model loads, for /metrics
        # Called with (stage, seconds) for each stage of a recommend request (the app's /metrics histogram).
        self.on_stage: Callable[[str, float], None] | None = None
        # called on the registry watcher's thread once per watch (about every reload_interval_s), after any swap:
        # the app publishes this worker's serving state for the other workers' /metrics
        self.on_tick: Callable[[], None] | None = None
        self._loop_lock = threading.Lock()
        self._loop_state: dict[str, Any] = {"running": False}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Service:
        """Read the dataset, open the store and the registry, serve the active version (loaded now: the first
        request already gets it), and start watching the registry. Idempotent."""
        if self._serving is not None:
            return self
        s = self.settings
        if s.data_dir is None:
            raise ValueError("settings.data_dir is not set: name the dataset directory the shop starts from")
        t0 = time.perf_counter()
        dataset = load_dataset(s.data_dir)
        self.dataset_name = dataset.name
        self.events = dataset.events  # canonical columns + item_idx, sorted by user then time
        self.base_catalog = dataset.catalog
        self._index_users(self.events)
        self._log_size = self._catalog_log_size()
        catalog, deleted = replay_catalog_log(self.settings.catalog_log, dataset.catalog)
        state = CatalogState.of(catalog, deleted, self.events)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(s.resolved_store_url, items=catalog, config=StoreConfig(pool_size=s.store_pool_size))
        # Group commit: impressions of concurrent requests share one transaction (each request still answers
        # only once its own impression is committed); alone, a request writes at once.
        self._impressions = MicroBatcher(self._write_impressions, max_batch=64, max_wait_s=0.0) \
            if s.batch_inference else None
        # ... and so do the event batches of concurrent requests: each write holds the ingestion counter's row
        # until its commit, so one transaction per request caps single-event posts at one commit at a time.
        # A group that fails is re-run request by request (MicroBatcher), so a bad event refuses only its own.
        self._events = MicroBatcher(self.store.add_event_groups, max_batch=32, max_wait_s=0.0) \
            if s.batch_inference else None
        self.registry = Registry(s.resolved_registry_dir)
        if s.explore_slots > 0:
            self.exposure.refresh(self.store)
        self.cooccurrence = CooccurrenceRecommender().fit(self.events, self.base_catalog)
        version = self._active_in_registry()
        model, info, error = None, {}, None
        if version is not None:
            try:
                model, info = self._load(version)
            except Exception as e:  # noqa: BLE001 - the shop still opens, on the fallback, and says why
                error = self._record_failure(version, e)
        self._serving = self._build(state, version if model is not None else FALLBACK_VERSION, model, info)
        if error is None and version is not None:
            self.load_counts["ok"] += 1
        self.started_at = time.time()
        log.info("serving %s over %d items (%s store) after %.1fs", self._serving.version, len(catalog),
                 self.store.backend, time.perf_counter() - t0)
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="dragonrec-registry-watch", daemon=True)
        self._watcher.start()
        return self

    def close(self) -> None:
        """Stop watching the registry and close the store."""
        self._stop.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
            self._watcher = None
        if self._serving is not None:
            self.store.close()
            self._serving = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def serving(self) -> Serving:
        s = self._serving
        if s is None:
            raise ServiceError("the service is not started", status=503)
        return s

    @property
    def catalog(self) -> Catalog:
        """The catalog as served now (deleted items are still in it; `item()` hides them)."""
        return self.serving.catalog

    @property
    def model_version(self) -> str:
        """The version requests are answered with now ("popularity" when no version is active or loads)."""
        return self.serving.version

    # -- catalog --------------------------------------------------------------------------------------------
    def item(self, item_id: str) -> dict | None:
        """A live product as a dict (item_id, title, brand, category, price, description, extra), or None."""
        st = self.serving.state
        if item_id not in st.catalog:
            return None
        idx = st.catalog.index_of(item_id)
        return None if idx in st.deleted else item_dict(st.catalog, idx)

    def search(self, query: str, limit: int = 24, offset: int = 0) -> list[dict]:
        """Live products whose title, brand, category or description hold every word of `query`
        (case-insensitive), most popular first; an empty query lists the popular ones."""
        return self.search_page(query, limit, offset)[0]

    def search_page(self, query: str, limit: int = 24, offset: int = 0) -> tuple[list[dict], int]:
        """`search` plus how many products match in all."""
        st = self.serving.state
        found = st.search(query or "")
        page = found[max(offset, 0):max(offset, 0) + max(limit, 0)]
        return [item_dict(st.catalog, int(i)) for i in page], len(found)

    def popular(self, limit: int = 24) -> list[dict]:
        """The live products most users showed interest in (dataset events), most popular first."""
        st = self.serving.state
        return [item_dict(st.catalog, int(i)) for i in st.by_popularity[:max(limit, 0)]]

    def add_item(self, item: ItemIn) -> dict:
        """A new product (a deleted one comes back with these fields); recommendable, searchable and
        accepted in events once this returns. Conflict if the item exists."""
        with self._admin:
            st = self.serving.state
            if item.item_id in st.catalog and st.catalog.index_of(item.item_id) not in st.deleted:
                raise Conflict(f"item {item.item_id!r} already exists: PATCH /v1/items/{item.item_id} edits it")
            fields = item.model_dump()
            if item.item_id in st.catalog:
                idx = st.catalog.index_of(item.item_id)
                catalog = edited(st.catalog, idx, fields, replace_all=True)
                deleted = st.deleted - {idx}
            else:
                catalog = append_items(st.catalog, [catalog_row(fields, st.catalog.items.columns)])
                deleted = st.deleted
            self._change_catalog(catalog, deleted, {"op": "add", "item": fields})
            return self.item(item.item_id)

    def update_item(self, item_id: str, patch: ItemPatch) -> dict:
        """Change some fields of a live product (its text is re-embedded for dense retrieval)."""
        with self._admin:
            st = self.serving.state
            idx = self._live_index(st, item_id)
            fields = patch.model_dump(exclude_unset=True)
            if not fields:
                raise Invalid("nothing to change: send at least one field")
            if "title" in fields and fields["title"] is None:
                raise Invalid("title cannot be removed")
            current = item_dict(st.catalog, idx)
            merged = {**current, **fields}
            if "extra" in fields:
                merged["extra"] = {**current.get("extra", {}), **(fields["extra"] or {})}
            catalog = edited(st.catalog, idx, merged, replace_all=False)
            self._change_catalog(catalog, st.deleted, {"op": "edit", "item": merged})
            return self.item(item_id)

    def delete_item(self, item_id: str) -> None:
        """Hide a product: never recommended or listed again; events naming it are still accepted."""
        with self._admin:
            st = self.serving.state
            idx = self._live_index(st, item_id)
            self._change_catalog(st.catalog, st.deleted | {idx}, {"op": "delete", "item_id": item_id})

    def _live_index(self, st: CatalogState, item_id: str) -> int:
        if item_id not in st.catalog or st.catalog.index_of(item_id) in st.deleted:
            raise NotFound(f"unknown item {item_id!r}")
        return st.catalog.index_of(item_id)

    def _change_catalog(self, catalog: Catalog, deleted: frozenset[int], change: dict) -> None:
        """Build the new Serving first (nothing changes if that fails), then record the change, let the store
        accept the items, and swap. Called under the admin lock."""
        cur = self.serving
        state = CatalogState.of(catalog, frozenset(deleted), self.events)
        new = cur if catalog is cur.catalog else self._build(state, cur.version, cur.model, cur.info)
        new = replace(new, state=state)
        self._append_catalog_log(change)
        self.store.known_items = frozenset(map(str, catalog.item_ids))
        self._serving = new

    # -- recommend ------------------------------------------------------------------------------------------
    def recommend(self, req: RecommendRequest) -> RecommendResponse:
        """A list for one user (an unknown user is a cold start), with the impression stored before it returns.

        The history is the user's dataset events plus their stored events; `context` adds the page's item and
        the cart (never recommended) and stated preferences; `filters` and recently scrolled-past or removed
        items are left out; `diversity` (default: the settings') spreads the list by the pipeline's re-ranker
        (MMR over item text vectors, 0 = relevance order). With `explore_slots`, a bandit gives up to that many
        slots of a share of the lists to rarely shown candidates; every slot's probability is stored."""
        sv = self.serving
        st, s = sv.state, self.settings
        n = req.n or s.default_n
        if n > s.max_n:
            raise Invalid(f"n must be at most {s.max_n}, got {n}")
        ctx = req.context
        for where, ids in (("context.item_id", [ctx.item_id] if ctx.item_id else []), ("context.cart", ctx.cart)):
            unknown = [i for i in ids if i not in st.catalog]
            if unknown:
                raise Invalid(f"{where}: unknown item {unknown[0]!r}")
        now = time.time()
        t0 = time.perf_counter()
        history, actions, demoted = self._history_for(req.user_id, st.catalog, now)
        t1 = time.perf_counter()
        try:
            filters, excluded_ids = request_filters(req.filters)
        except ValueError as e:
            raise Invalid(str(e)) from None
        excluded_ids = [i for i in excluded_ids if i in st.catalog]
        exclude = np.unique(np.concatenate([demoted, st.deleted_indices, st.catalog.indices(excluded_ids)]))
        exploring = s.explore_epsilon > 0 or s.explore_slots > 0
        fetch = max(n, s.explore_pool) if exploring else n
        context = RequestContext(item_id=ctx.item_id, cart=list(ctx.cart), preferences=ctx.preferences_obj(),
                                 diversity=req.diversity, filters=filters)  # None: the settings' knob
        # A cold user's exploration slots vary by user (stable for one user across pages).
        t2 = time.perf_counter()
        recs = sv.pipeline.recommend_for(history, actions, fetch, context, exclude=exclude.tolist(),
                                         seed=zlib.crc32(req.user_id.encode()))
        t3 = time.perf_counter()
        if s.explore_slots > 0:
            chosen, propensities, _ = bandit_explore(list(recs)[:n], list(recs), self.exposure, s.explore_slots,
                                                     s.explore_share, s.explore_pool, s.explore_max_shown)
        else:
            chosen, propensities = explore(list(recs)[:n], list(recs), s.explore_epsilon, s.explore_pool)
        request_id = uuid.uuid4().hex
        label = sv.label if req.surface is None else f"{sv.label}@{req.surface}"
        impression = Impression(
            request_id=request_id, user_id=req.user_id, item_ids=[r.item_id for r in chosen],
            model_version=sv.version, pipeline=label, timestamp=now, scores=[float(r.score) for r in chosen],
            sources=[r.source for r in chosen], propensities=propensities)
        t4 = time.perf_counter()
        if self._impressions is None:
            self.store.add_impression(impression)
        else:
            self._impressions.submit([impression])
        if self.on_stage is not None:
            for stage, seconds in (("history", t1 - t0), ("pipeline", t3 - t2), ("impression", time.perf_counter() - t4)):
                self.on_stage(stage, seconds)
        return RecommendResponse(
            request_id=request_id, model_version=sv.version, cold=recs.cold,
            items=[RecommendedItem(item_id=r.item_id, score=finite(r.score), source=r.source, reason=r.reason)
                   for r in chosen])

    def _write_impressions(self, impressions: list[Impression]) -> list[None]:
        """One transaction for the impressions of concurrent requests (request ids are fresh: none repeats)."""
        self.store.add_impressions(impressions)
        return [None] * len(impressions)

    def _history_for(self, user_id: str, catalog: Catalog, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(catalog indices, actions, demoted indices) of a user: dataset events, then stored events. Negative
        events (scroll past, remove from cart) within the demotion window demote their item; older ones
        leave the history (they are weak and stale), so the item may come back."""
        idx, acts, ts = self._dataset_history(user_id)
        live = [e for e in self.store.recent_events(user_id, self.settings.history_limit) if e[0] in catalog]
        if live:
            idx = np.concatenate([idx, catalog.indices([e[0] for e in live])])
            acts = np.concatenate([acts, np.asarray([e[1] for e in live], dtype=object)])
            ts = np.concatenate([ts, np.asarray([e[2] for e in live], dtype=np.float64)])
        negative = np.isin(acts, list(NEGATIVE_ACTIONS))
        recent = ts >= now - self.settings.demotion_window_s
        demoted = np.unique(idx[negative & recent])
        keep = ~negative | recent
        m = self.settings.history_limit
        return idx[keep][-m:], acts[keep][-m:], demoted

    def _index_users(self, events: pd.DataFrame) -> None:
        users = events["user_id"].to_numpy(dtype=object)
        cuts = np.flatnonzero(users[1:] != users[:-1]) + 1 if len(users) else np.zeros(0, np.int64)
        starts = np.concatenate([[0], cuts]).astype(np.int64) if len(users) else np.zeros(0, np.int64)
        ends = np.concatenate([cuts, [len(users)]]).astype(np.int64) if len(users) else np.zeros(0, np.int64)
        self._user_rows = {users[a]: (int(a), int(b)) for a, b in zip(starts, ends)}
        self._ev_items = events["item_idx"].to_numpy(dtype=np.int64)
        self._ev_actions = events["action"].astype(str).to_numpy(dtype=object)
        self._ev_ts = events["timestamp"].to_numpy(dtype=np.float64)

    def _dataset_history(self, user_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self._user_rows.get(user_id, (0, 0))
        return self._ev_items[a:b], self._ev_actions[a:b], self._ev_ts[a:b]

    # -- events ---------------------------------------------------------------------------------------------
    def ingest(self, events: list[EventIn]) -> IngestResult:
        """Store a batch of events, all or nothing; an event_id already stored counts as a duplicate.
        Unknown items, too many events or a timestamp far in the future refuse the whole batch."""
        s = self.settings
        if not events:
            raise Invalid("no events: send at least one")
        if len(events) > s.max_events_per_batch:
            raise TooLarge(f"{len(events)} events in one batch; at most {s.max_events_per_batch}")
        catalog = self.serving.catalog
        now = time.time()
        rows = []
        for i, e in enumerate(events):
            if e.item_id not in catalog:
                raise Invalid(f"events[{i}].item_id: unknown item {e.item_id!r}; nothing of the batch was stored")
            if e.timestamp is not None and e.timestamp > now + FUTURE_SLACK_S:
                raise Invalid(f"events[{i}].timestamp: {e.timestamp} is more than a day in the future; "
                              "nothing of the batch was stored")
            rows.append({"event_id": e.event_id, "user_id": e.user_id, "item_id": e.item_id, "action": e.action,
                         "timestamp": now if e.timestamp is None else e.timestamp, "request_id": e.request_id,
                         "value": e.value, "session_id": e.session_id})
        try:
            if self._events is None:
                accepted, duplicates = self.store.add_events(rows)
            else:  # acknowledged once the shared transaction is committed, as alone
                accepted, duplicates = self._events.submit([rows])[0]
        except StoreError as e:
            raise Invalid(str(e)) from None
        return IngestResult(accepted=accepted, duplicates=duplicates)

    def history(self, user_id: str, limit: int | None = None) -> list[dict]:
        """A user's events, oldest first: dataset events ("origin": "dataset") then stored ones ("live")."""
        a, b = self._user_rows.get(user_id, (0, 0))
        ids = self.base_catalog.item_ids
        out = [{"item_id": str(ids[self._ev_items[k]]), "action": self._ev_actions[k], "timestamp": float(self._ev_ts[k]),
                "request_id": None, "value": None, "origin": "dataset"} for k in range(a, b)]
        live = self.store.events_of_user(user_id, limit=limit)
        for r in live.itertuples(index=False):
            out.append({"item_id": r.item_id, "action": r.action, "timestamp": float(r.timestamp),
                        "request_id": r.request_id, "value": None if pd.isna(r.value) else float(r.value),
                        "origin": "live"})
        return out[-limit:] if limit else out

    # -- models ---------------------------------------------------------------------------------------------
    def models(self) -> dict:
        """The registry's versions with which one is active and which one serves, plus the loading state."""
        active = self._active_in_registry()
        serving = self.model_version
        versions = [{**v.model_dump(include={"version", "method", "parent", "created", "metrics", "note"}),
                     "active": v.version == active, "serving": v.version == serving} for v in self.registry.list()]
        return {"active": active, "serving": serving, "loading": self._loading, "load_error": self._load_error,
                "versions": versions}

    def activate(self, version: str, wait: bool = False, timeout: float = 300.0) -> dict:
        """Make `version` the registry's active one; this process (and every other one watching the registry)
        loads it in the background and swaps. `wait`: return once this process serves it (or its load
        failed). NotFound for an unknown version, Conflict for a broken one."""
        try:
            self.registry.get(version, verify=False)
        except RegistryError as e:
            raise NotFound(str(e)) from None
        try:
            self.registry.activate(version)
        except RegistryError as e:
            raise Conflict(str(e)) from None
        return self._after_pointer_change(version, wait, timeout)

    def rollback(self, wait: bool = False, timeout: float = 300.0) -> dict:
        """Re-activate the version that was active before; Conflict when there is none."""
        try:
            version = self.registry.rollback().version
        except RegistryError as e:
            raise Conflict(str(e)) from None
        return self._after_pointer_change(version, wait, timeout)

    def _after_pointer_change(self, version: str, wait: bool, timeout: float) -> dict:
        with self._admin:
            if self._failed == version:
                self._failed = None  # asked for explicitly: try again
        self._wake.set()
        if wait:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.model_version == version or (self._failed == version and self._loading != version):
                    break
                time.sleep(0.02)
        return {"active": version, "serving": self.model_version, "loading": self._loading}

    def _active_in_registry(self) -> str | None:
        return self.registry.active_version()

    def _load(self, version: str) -> tuple[Recommender, dict]:
        mv = self.registry.get(version, verify=True)
        model = load_version(mv, self.base_catalog)
        return model, mv.info.model_dump(include={"version", "method", "parent", "created", "metrics", "note"})

    def rerank_config(self) -> RerankConfig:
        """The re-rank stage from settings: the default diversity knob and the shop's rules."""
        s = self.settings
        return RerankConfig(diversity=s.diversity, mode=s.diversity_mode, relevance=s.diversity_relevance,
                            novelty=s.diversity_novelty,
                            category_cap=s.category_cap, calibration=s.calibration, cold_item_slots=s.cold_item_slots,
                            cold_item_rank=s.cold_item_rank, new_item_slots=s.new_item_slots)

    def _build(self, state: CatalogState, version: str, model: Recommender | None, info: dict) -> Serving:
        # Concurrent requests share every stage (batch_pipeline, which waits for company) and the model's
        # forward passes (batched: no wait of its own, the pipeline's batch already gathered the requests).
        s = self.settings
        pipe, label = build_pipeline(state, self.events, self.cooccurrence, model, self.settings.quotas,
                                     self.settings.embedding_cache_dir, self.embedder, self.rerank_config(),
                                     wrap_model=lambda m: batched(m, s.batch_inference, s.batch_max_size, 0.0))
        batch_pipeline(pipe, s.batch_inference, s.batch_max_size, s.batch_max_wait_ms)
        return Serving(state=state, pipeline=pipe, version=version, model=model, label=label, info=info)

    def _record_failure(self, version: str, e: BaseException) -> dict:
        self.load_counts["failed"] += 1
        self._failed = version
        self._load_error = {"version": version, "error": f"{type(e).__name__}: {e}", "at": time.time()}
        log.error("loading model version %s failed; still serving %s: %s\n%s", version,
                  self._serving.version if self._serving else FALLBACK_VERSION, e,
                  "".join(traceback.format_exception(e)))
        return self._load_error

    def _watch(self) -> None:
        """Poll the registry's active version and the catalog change log (other API processes share both);
        load a changed version or catalog here, off the request path, and swap."""
        while not self._stop.is_set():
            self._wake.wait(self.settings.reload_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.settings.explore_slots > 0:
                try:
                    self.exposure.refresh(self.store)
                except Exception as e:  # noqa: BLE001 - the bandit explores on the counts it has
                    log.warning("reading item exposure from the store failed: %s", e)
            try:
                self._sync_catalog()
            except Exception as e:  # noqa: BLE001 - keep serving the catalog we have
                log.warning("following the catalog change log failed: %s", e)
            try:
                version = self._active_in_registry()
            except Exception as e:  # noqa: BLE001 - a half-readable registry must not stop the watcher
                log.warning("reading the registry's active version failed: %s", e)
                continue
            if version is not None and version == self.model_version and self._failed not in (None, version):
                with self._admin:  # the version that failed is no longer active: its error is history
                    self._failed, self._load_error = None, None
            if not (version is None or version == self.model_version or version == self._failed):
                self.swap_to(version)
            self._tick()

    def _tick(self) -> None:
        if self.on_tick is not None:
            try:
                self.on_tick()
            except Exception as e:  # noqa: BLE001 - a metrics hook must never stop the watcher
                log.warning("the watch hook failed: %s", e)

    def swap_to(self, version: str) -> bool:
        """Load `version` and swap it in (the old one serves until then, and on failure). True if swapped."""
        self._loading = version
        try:
            t0 = time.perf_counter()
            model, info = self._load(version)
            with self._admin:
                state = self.serving.state
            new = self._build(state, version, model, info)  # the slow part, without the lock
            with self._admin:
                if self.serving.state is not state:  # the catalog changed meanwhile: follow it
                    new = self._build(self.serving.state, version, model, info)
                old = self.serving
                self._serving = new
                self._failed, self._load_error = None, None
                self.load_counts["ok"] += 1
            log.info("swapped %s -> %s in %.1fs", old.version, version, time.perf_counter() - t0)
            return True
        except Exception as e:  # noqa: BLE001 - keep serving the old version, say why in /health
            self._record_failure(version, e)
            return False
        finally:
            self._loading = None

    # -- loop -----------------------------------------------------------------------------------------------
    def loop_status(self) -> dict:
        """{"configured", "running", "detail"}: the loop's own status plus the last run's outcome."""
        if self.loop is None:
            return {"configured": False, "running": False, "detail": {"message": "no loop configured"}}
        with self._loop_lock:
            state = dict(self._loop_state)
        try:
            own = self.loop.status() or {}
        except Exception as e:  # noqa: BLE001 - a status call must not take /v1/loop/status down
            own = {"status_error": f"{type(e).__name__}: {e}"}
        running = state.pop("running")
        return {"configured": True, "running": running, "detail": {**own, **state}}

    def run_loop(self) -> dict:
        """Start one round of the loop in the background; Conflict when none is configured or one runs."""
        if self.loop is None:
            raise Conflict("no loop configured")
        with self._loop_lock:
            if self._loop_state["running"]:
                raise Conflict("the loop is already running")
            self._loop_state = {"running": True, "started_at": time.time()}
        threading.Thread(target=self._run_loop, name="dragonrec-loop", daemon=True).start()
        return self.loop_status()

    def _run_loop(self) -> None:
        outcome: dict[str, Any] = {}
        try:
            result = self.loop.run()
            outcome["last_result"] = result if isinstance(result, (dict, list, str, int, float, type(None))) \
                else repr(result)
            self._wake.set()  # the loop may have promoted a version
        except Exception as e:
            log.exception("the loop failed")
            outcome["last_error"] = f"{type(e).__name__}: {e}"
        with self._loop_lock:
            self._loop_state = {**self._loop_state, **outcome, "running": False, "finished_at": time.time()}

    # -- keys, health ---------------------------------------------------------------------------------------
    def check_api_key(self, key: str | None) -> bool:
        """Whether `key` is one of the configured keys (constant-time; every key is compared)."""
        if not key:
            return False
        given = key.encode()
        ok = False
        for k in self.settings.api_keys:
            ok |= hmac.compare_digest(given, k.get_secret_value().encode())
        return ok

    def status(self) -> dict:
        """What /health says: ok or degraded (the active version failed to load), what serves, what loads."""
        sv = self.serving
        try:
            active = self._active_in_registry()
        except Exception:  # noqa: BLE001
            active = None
        degraded = self._load_error is not None and active not in (None, sv.version)
        return {"status": "degraded" if degraded else "ok", "model_version": sv.version, "active_version": active,
                "loading": self._loading, "load_error": self._load_error,
                "catalog_items": int(sv.state.live.sum()), "store": self.store.backend,
                "uptime_s": time.time() - (self.started_at or time.time())}

    # -- catalog changes on disk ----------------------------------------------------------------------------
    def _catalog_log_size(self) -> int:
        path = self.settings.catalog_log
        return path.stat().st_size if path.exists() else 0

    def _sync_catalog(self) -> bool:
        """Follow products added, edited or deleted by other processes sharing the state dir: when the change
        log grew, replay it and swap in the result if it differs from what serves. True if it swapped."""
        size = self._catalog_log_size()
        if size == self._log_size:
            return False
        with self._admin:
            self._log_size = size
            catalog, deleted = replay_catalog_log(self.settings.catalog_log, self.base_catalog)
            cur = self.serving
            if deleted == cur.state.deleted and catalog.items.equals(cur.catalog.items):
                return False  # our own changes
            state = CatalogState.of(catalog, deleted, self.events)
            new = self._build(state, cur.version, cur.model, cur.info)
            self.store.known_items = frozenset(map(str, catalog.item_ids))
            self._serving = new
            log.info("followed the catalog change log: %d items, %d deleted", len(catalog), len(deleted))
            return True

    def _append_catalog_log(self, change: dict) -> None:
        path = self.settings.catalog_log
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**change, "at": time.time()}, ensure_ascii=False, default=jsonable) + "\n"
        with path.open("a+b") as f:  # read too: the last byte says whether the previous line was finished
            fcntl.flock(f, fcntl.LOCK_EX)  # processes sharing the state dir append one whole line at a time
            try:
                if f.seek(0, os.SEEK_END) > 0 and os.pread(f.fileno(), 1, f.tell() - 1) != b"\n":
                    f.write(b"\n")  # a writer killed mid-line left it unfinished: it must not swallow this one
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())  # the change is on disk before the API acknowledges it
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
