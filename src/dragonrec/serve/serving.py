"""What a request is answered with: the catalog as it is now and the pipeline built for it and one model version.

A `Serving` is immutable. Every change (a product added, edited or deleted; another model version) builds a
new one off the request path and the service swaps one reference, so a request in flight finishes on the
object it started with and nothing is mutated under it.

Fitted models know the catalog they were trained on. Products added through the API are appended after it
(deleted ones stay in the catalog, hidden), so the trained catalog is always a prefix of the served one and
`GrownCatalogModel` serves the old model over the longer catalog: histories keep the items it knows; a
generative model with a calibrated cold head scores the new items from their text (no retraining), other models
give them -inf. Dense retrieval and the cold-start list still propose them, and for models that cannot score
them the re-ranker's new-product slots (`RerankConfig.new_item_slots`) give the ones proposed a few places in the
list (exploration for new items) instead of sinking them below every item the model scored.

The re-rank stage is the pipeline's `DiversityReranker`: shop rules, the request's `diversity` knob and filters,
caps, calibration, cold-item slots, then the new-product slots. Exploration over rarely shown
candidates is a Thompson-sampling bandit on each item's click-through posterior from the feedback store
(`ItemExposure`, `bandit_explore`), each slot's exact probability stored with the impression.

Catalog changes are also logged (JSON lines under the state dir) and `replay_catalog_log` rebuilds the
catalog from the dataset's plus the log: on start, and when another process sharing the state dir wrote to it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from dragonrec.candidates.sources import DenseConfig, ModelSource
from dragonrec.data.catalog import Catalog
from dragonrec.data.stats import item_popularity
from dragonrec.embed import Embedder
from dragonrec.evaluate.experiment import saved_recommender_name
from dragonrec.pipeline import SOURCE_REASONS, Pipeline, PipelineConfig
from dragonrec.recommenders import recommender_class
from dragonrec.recommenders.base import Recommender
from dragonrec.registry import ModelVersion
from dragonrec.rerank import DiversityReranker, Filters, RerankConfig
from dragonrec.schema import POSITIVE_ACTIONS
from dragonrec.serve.schemas import FiltersIn

log = logging.getLogger("dragonrec.serve")

FALLBACK_VERSION = "popularity"
"""The version name of the pipeline without a model (no active registry version, or none loads)."""
ITEM_FIELDS = ("item_id", "title", "brand", "category", "price", "description")


class GrownCatalogModel:
    """A fitted recommender served over a catalog that grew after it was fitted (its catalog is a prefix).

    A model with a calibrated cold head (`scores_new_items`: the generative model) scores the new products from
    their text, embedded here once per catalog change (`cache_dir`/`embedder` as the model's own item text);
    others give them -inf."""

    def __init__(self, model: Recommender, catalog: Catalog, cache_dir: str | None = None,
                 embedder: Embedder | None = None):
        base = model.catalog.item_ids
        if len(catalog) < len(base) or list(catalog.item_ids[:len(base)]) != list(base):
            raise ValueError(f"{model.name} was fitted on a catalog that is not a prefix of the served one")
        self.model, self.catalog, self.name = model, catalog, model.name
        self.n_base = len(base)
        self.new_text = None
        if len(catalog) > self.n_base and getattr(model, "scores_new_items", False):
            from dragonrec.embed import catalog_texts, embed_texts

            self.new_text = embed_texts(catalog_texts(catalog)[self.n_base:], embedder=embedder, cache_dir=cache_dir)

    @property
    def scores_new_items(self) -> bool:
        return self.new_text is not None or len(self.catalog) == self.n_base

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, len(catalog)] float32: the model's scores; items it never knew by its cold head, else -inf.
        History items added after training are left out of the model's input."""
        n = len(self.catalog)
        if n == self.n_base:
            return self.model.score(histories, actions)
        keep = [np.asarray(h, dtype=np.int64) < self.n_base for h in histories]
        h = [np.asarray(hist, dtype=np.int64)[k] for hist, k in zip(histories, keep)]
        a = None if actions is None else [np.asarray(act, dtype=object)[k] for act, k in zip(actions, keep)]
        if self.new_text is not None:
            return self.model.score(h, a, new_text=self.new_text)
        out = np.full((len(histories), n), -np.inf, dtype=np.float32)
        out[:, :self.n_base] = self.model.score(h, a)
        return out


def request_filters(filters: FiltersIn | None) -> tuple[Filters | None, list[str]]:
    """The re-ranker's filters of a request and the item ids it excludes. ValueError when they contradict."""
    if filters is None:
        return None, []
    fields = filters.model_dump(exclude={"exclude"})
    try:
        out = Filters(**fields)
    except ValidationError as e:  # say only the rule that failed
        raise ValueError("filters: " + "; ".join(str(x["msg"]).removeprefix("Value error, ") for x in e.errors())) \
            from None
    return out, list(filters.exclude)


def load_version(version: ModelVersion, catalog: Catalog) -> Recommender:
    """The recommender a registry version holds, loaded for `catalog` (the one it was trained on)."""
    name = saved_recommender_name(version.path)
    return recommender_class(name).load(Path(version.path), catalog)


@dataclass(frozen=True)
class CatalogState:
    """The served catalog plus what search, filters and popularity read from it (computed once)."""

    catalog: Catalog
    deleted: frozenset[int]  # catalog indices hidden by DELETE /v1/items (kept so indices stay stable)
    popularity: np.ndarray  # [n] distinct users with a positive dataset event per item (0 for new items)

    @classmethod
    def of(cls, catalog: Catalog, deleted: frozenset[int], events: pd.DataFrame) -> CatalogState:
        return cls(catalog, deleted, item_popularity(events, len(catalog)))

    def __len__(self) -> int:
        return len(self.catalog)

    @cached_property
    def live(self) -> np.ndarray:
        """[n] bool: not deleted."""
        out = np.ones(len(self.catalog), dtype=bool)
        out[list(self.deleted)] = False
        return out

    @cached_property
    def deleted_indices(self) -> np.ndarray:
        return np.asarray(sorted(self.deleted), dtype=np.int64)

    @cached_property
    def by_popularity(self) -> np.ndarray:
        """Live catalog indices, most popular first (ties: catalog order)."""
        idx = np.flatnonzero(self.live)
        return idx[np.argsort(-self.popularity[idx], kind="stable")]

    def column(self, name: str) -> np.ndarray:
        items = self.catalog.items
        if name not in items:
            return np.full(len(items), "", dtype=object)
        return items[name].fillna("").astype(str).str.lower().to_numpy(dtype=object)

    @cached_property
    def haystack(self) -> np.ndarray:
        """Lower-case title, brand, category and description per item, for search."""
        parts = [self.column(c) for c in ("title", "brand", "category", "description")]
        return np.asarray([" ".join(p) for p in zip(*parts)], dtype=object)

    @cached_property
    def categories(self) -> np.ndarray:
        return self.column("category")

    @cached_property
    def brands(self) -> np.ndarray:
        return self.column("brand")

    @cached_property
    def prices(self) -> np.ndarray:
        items = self.catalog.items
        if "price" not in items:
            return np.full(len(items), np.nan)
        return pd.to_numeric(items["price"], errors="coerce").to_numpy(dtype=np.float64)

    def search(self, query: str) -> np.ndarray:
        """Live items whose text holds every word of the query, most popular first."""
        words = [w for w in re.split(r"\s+", query.strip().lower()) if w]
        order = self.by_popularity
        if not words:
            return order
        hay = self.haystack
        return np.asarray([i for i in order if all(w in hay[i] for w in words)], dtype=np.int64)


@dataclass(frozen=True)
class Serving:
    """One consistent view a request is answered from: catalog, pipeline, model version."""

    state: CatalogState
    pipeline: Pipeline
    version: str  # registry version, or FALLBACK_VERSION
    model: Recommender | None  # the loaded model of that version (None for the fallback)
    label: str  # the pipeline as impressions record it
    info: dict = field(default_factory=dict)  # the version's registry metadata

    @property
    def catalog(self) -> Catalog:
        return self.state.catalog


def build_pipeline(state: CatalogState, train: pd.DataFrame, cooccurrence: Recommender,
                   model: Recommender | None, quotas: dict[str, int], cache_dir: str | None,
                   embedder: Embedder | None = None, rerank: RerankConfig | None = None,
                   wrap_model: Callable[[Any], Any] | None = None) -> tuple[Pipeline, str]:
    """The union pipeline over `state.catalog`: dense retrieval, co-occurrence, the model's own top K and
    popularity, scored by the model; without a model, the same sources minus the model in fused retrieval
    order. Co-occurrence and the model are fitted already (on the dataset's catalog, a prefix of this one);
    products added since get up to `rerank.new_item_slots` places in a list when retrieval proposes them and the
    model cannot rank them. `rerank`: shop rules and the default diversity knob (a request may override the knob
    and add filters);
    `wrap_model` wraps the served model (over the grown catalog), e.g. to batch its forward passes."""
    catalog = state.catalog
    served = None if model is None else GrownCatalogModel(model, catalog, cache_dir=cache_dir, embedder=embedder)
    # a model that ranks new products itself (the generative model's cold head) needs no forced slots for them
    n_known = len(catalog) if served is not None and served.scores_new_items else len(cooccurrence.catalog)
    reranker = DiversityReranker(rerank, n_scored=n_known)
    cooc = ModelSource(GrownCatalogModel(cooccurrence, catalog), name="cooccurrence",
                       reason=SOURCE_REASONS["cooccurrence"])
    dense = DenseConfig(cache_dir=cache_dir)
    if model is None:
        sources = {k: v for k, v in quotas.items() if k != "model"}
        cfg = PipelineConfig(sources=sources, scorer="none", dense=dense,
                             rest="popularity" if "popularity" in sources else None)
        pipe = Pipeline(cfg, sources={"cooccurrence": cooc}, embedder=embedder, reranker=reranker)
        label = f"union[{'+'.join(sources)}] scorer=none"
    else:
        sources = dict(quotas) if "model" in quotas else {**quotas, "model": 100}
        cfg = PipelineConfig.union(sources, model=model.name, scorer="model", rest="model", dense=dense)
        pipe = Pipeline(cfg, model=served if wrap_model is None else wrap_model(served), sources={"cooccurrence": cooc},
                        embedder=embedder, reranker=reranker)
        label = f"union[{'+'.join(sources)}] scorer=model:{model.name}"
    return pipe.fit(train, catalog), label


def catalog_row(item: dict, columns: Sequence[str]) -> dict:
    """A catalog table row from an API item: canonical fields, then its extras as columns."""
    row = {c: item.get(c) for c in ITEM_FIELDS}
    row["price"] = np.nan if row["price"] is None else float(row["price"])
    for k, v in (item.get("extra") or {}).items():
        if k not in ITEM_FIELDS:
            row[k] = v
    for c in columns:
        row.setdefault(c, None)
    return row


def replay_catalog_log(path: Path, catalog: Catalog) -> tuple[Catalog, frozenset[int]]:
    """`catalog` with every change logged in `path` (JSON lines: add, edit, delete) applied in order:
    (catalog, deleted indices). Unreadable lines are logged and skipped."""
    deleted: set[int] = set()
    if not path.exists():
        return catalog, frozenset()
    items = catalog
    pending: dict[str, dict] = {}  # new rows not appended yet: consecutive additions go in one concat

    def flush() -> None:
        nonlocal items
        if pending:
            items = append_items(items, list(pending.values()))
            pending.clear()

    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            change = json.loads(line) if line.strip() else None
            op = change and change["op"]
            item_id = change and (change.get("item_id") or change["item"]["item_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a catalog change; skipped", path, n)
            continue
        if op == "add" and item_id not in items and item_id not in pending:
            pending[item_id] = catalog_row(change["item"], items.items.columns)
            continue
        flush()
        if item_id not in items:
            continue
        idx = items.index_of(item_id)
        if op == "add":  # a deleted product added again: its fields as given
            items = edited(items, idx, change["item"], replace_all=True)
            deleted.discard(idx)
        elif op == "edit":
            items = edited(items, idx, change["item"], replace_all=False)
        elif op == "delete":
            deleted.add(idx)
    flush()
    return items, frozenset(deleted)


# -- catalog rows ------------------------------------------------------------------------------------------------
def item_dict(catalog: Catalog, idx: int) -> dict:
    item = catalog.item(idx).model_dump()
    item["extra"] = {k: jsonable(v) for k, v in item.get("extra", {}).items() if v is not None}
    if item.get("price") is not None and not np.isfinite(item["price"]):
        item["price"] = None
    return item


def jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def append_items(catalog: Catalog, rows: list[dict]) -> Catalog:
    return Catalog(pd.concat([catalog.items, pd.DataFrame(rows).astype(object)], ignore_index=True))


def edited(catalog: Catalog, idx: int, fields: dict, replace_all: bool) -> Catalog:
    """A copy of the catalog with row `idx` set from `fields` (canonical fields and `extra`); other columns
    keep their value, or are cleared with `replace_all` (a deleted item added again)."""
    items = catalog.items.copy()
    row = catalog_row(fields, items.columns if replace_all else ())
    for col, value in row.items():
        if col == "item_id":
            continue
        if col not in items:
            items[col] = pd.Series([None] * len(items), dtype=object)
        if value is not None and items[col].dtype != object and not isinstance(value, (int, float)):
            items[col] = items[col].astype(object)
        items.at[idx, col] = value
    return Catalog(items)


# -- exploration: a Thompson-sampling bandit over rarely shown candidates ------------------------------------
class ItemExposure:
    """Per item id: slots shown (impressions in the feedback store) and clicks (positive events answering a
    request, one per request and item), read incrementally from the store's ingestion cursors."""

    def __init__(self) -> None:
        self.shown: dict[str, int] = {}
        self.clicks: dict[str, int] = {}
        self._clicked: set[tuple[str, str]] = set()
        self._imp_cursor = self._ev_cursor = 0
        self._lock = threading.Lock()

    def refresh(self, store) -> int:
        """Read what arrived since the last call; returns the number of new impressions."""
        with self._lock:
            imps, self._imp_cursor = store.new_impressions(self._imp_cursor)
            shown = dict(self.shown)
            for imp in imps:
                for item in imp.item_ids:
                    shown[item] = shown.get(item, 0) + 1
            events, self._ev_cursor = store.new_events(self._ev_cursor)
            clicks = dict(self.clicks)
            if len(events):
                pos = events[events["action"].isin(POSITIVE_ACTIONS) & events["request_id"].notna()]
                for rid, item in zip(pos["request_id"].astype(str), pos["item_id"].astype(str)):
                    if (rid, item) not in self._clicked:
                        self._clicked.add((rid, item))
                        clicks[item] = clicks.get(item, 0) + 1
            self.shown, self.clicks = shown, clicks  # readers see the old or the new dicts, never half of one
            return len(imps)

    def posterior(self, item_ids: Sequence[str], prior: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
        """Beta posterior (a, b) [len(item_ids)] of each item's click-through rate: prior + clicks, prior +
        shown slots without a click."""
        shown, clicks = self.shown, self.clicks
        s = np.asarray([shown.get(i, 0) for i in item_ids], dtype=np.float64)
        c = np.minimum(np.asarray([clicks.get(i, 0) for i in item_ids], dtype=np.float64), s)
        return prior[0] + c, prior[1] + s - c


def thompson_rank_probabilities(a: np.ndarray, b: np.ndarray, k: int, grid: int = 512,
                                per_item: int = 32) -> tuple[np.ndarray, float]:
    """P[i, j] = P(candidate i's draw is the (j+1)-th largest) for independent draws theta_i ~ Beta(a_i, b_i):
    [K, min(k, K)], and the quadrature error (the largest |sum_i P[i, j] - 1| before normalising).

    P[i, j] = integral of P(exactly j of the others exceed t) dF_i(t): the integral as a sum over cells of a
    grid (uniform plus each posterior's quantiles, so narrow posteriors are resolved) of the cell's mass under
    F_i times the others' Poisson-binomial count at the cell's midpoint (a dynamic programme over candidates,
    leaving i out). Deterministic and exact up to that quadrature error, unlike a Monte-Carlo estimate."""
    # the Beta cdf and its inverse, without scipy.stats' per-call overhead
    from scipy.special import betainc, betaincinv

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    K = len(a)
    k = min(k, K)
    if K == 0 or k == 0:
        return np.zeros((K, 0)), 0.0
    levels = (np.arange(per_item) + 0.5) / per_item
    t = np.unique(np.concatenate([np.linspace(0.0, 1.0, grid + 1),
                                  betaincinv(a[:, None], b[:, None], levels[None, :]).ravel()]))
    mass = np.diff(betainc(a[:, None], b[:, None], t[None, :]), axis=1)  # [K, G-1]
    above = betainc(b[:, None], a[:, None], 1.0 - ((t[1:] + t[:-1]) / 2)[None, :])  # [K, G-1]: P(theta > mid)
    count = np.zeros((K, len(t) - 1, k))  # [i, cell, c]: P(exactly c of the others seen so far exceed t)
    count[:, :, 0] = 1.0
    for o in range(K):
        p = above[o][None, :, None]
        new = count * (1.0 - p)
        new[:, :, 1:] += count[:, :, :-1] * p
        new[o] = count[o]  # i's own draw is not among "the others"
        count = new
    probs = np.einsum("ig,igc->ic", mass, count)
    total = probs.sum(axis=0, keepdims=True)
    return probs / total, float(np.abs(total - 1.0).max())


def bandit_explore(greedy: list, ranked: list, exposure: ItemExposure, slots: int, share: float, pool: int,
                   max_shown: int, rng: np.random.Generator | None = None) -> tuple[list, list[float], int]:
    """Thompson sampling over the request's rarely shown candidates: (list, each slot's probability, slots
    explored).

    The candidates: the ranked list's top `pool` items outside the greedy list shown at most `max_shown` times.
    With probability `share` the request explores: one draw theta_i ~ Beta(1 + clicks_i, 1 + shown_i - clicks_i)
    per candidate, and the k = min(slots, n, candidates) highest draws replace the greedy list's last k items,
    highest first. The probabilities are exact (no other choice depends on the coin): an explored slot j holds
    item i with share * P(i's draw is the (j+1)-th largest) (`thompson_rank_probabilities`), the greedy item in
    that slot was shown with 1 - share, the slots above the last k with 1."""
    n = len(greedy)
    ids = {r.item_id for r in greedy}
    shown = exposure.shown
    cands = [r for r in ranked[:max(pool, n)] if r.item_id not in ids and shown.get(r.item_id, 0) <= max_shown]
    k = min(slots, n, len(cands))
    if share <= 0 or k == 0:
        return list(greedy), [1.0] * n, 0
    rng = rng or np.random.default_rng()
    if rng.random() >= share:
        return list(greedy), [1.0] * (n - k) + [1.0 - share] * k, 0
    a, b = exposure.posterior([r.item_id for r in cands])
    top = np.argsort(-rng.beta(a, b), kind="stable")[:k]
    probs, _ = thompson_rank_probabilities(a, b, k)
    picked = [replace(cands[i], source="explore", reason=EXPLORE_REASON) for i in top]
    return (list(greedy[:n - k]) + picked, [1.0] * (n - k) + [share * float(probs[i, j]) for j, i in enumerate(top)],
            k)


EXPLORE_REASON = "rarely shown yet: we are learning whether shoppers like it"


def finite(x: float) -> float:
    return float(x) if np.isfinite(x) else -1e30
