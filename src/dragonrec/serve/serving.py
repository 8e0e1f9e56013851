"""What a request is answered with: the catalog as it is now and the pipeline built for it and one model version.

A `Serving` is immutable. Every change (a product added, edited or deleted; another model version) builds a
new one off the request path and the service swaps one reference, so a request in flight finishes on the
object it started with and nothing is mutated under it.

Fitted models know the catalog they were trained on. Products added through the API are appended after it
(deleted ones stay in the catalog, hidden), so the trained catalog is always a prefix of the served one and
`GrownCatalogModel` serves the old model over the longer catalog: histories keep the items it knows, new
items score -inf by it. Dense retrieval and the cold-start list still propose them, and `NewItemSlots` gives
the ones proposed a few places in the list (exploration for new items) instead of sinking them below every
item the model scored.

Catalog changes are also logged (JSON lines under the state dir) and `replay_catalog_log` rebuilds the
catalog from the dataset's plus the log: on start, and when another process sharing the state dir wrote to it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dragonrec.candidates.sources import DenseConfig, ModelSource
from dragonrec.data.catalog import Catalog
from dragonrec.data.stats import item_popularity
from dragonrec.embed import Embedder
from dragonrec.evaluate.experiment import saved_recommender_name
from dragonrec.pipeline import SOURCE_REASONS, Pipeline, PipelineConfig, Recommendations, Reranker
from dragonrec.recommenders import recommender_class
from dragonrec.recommenders.base import Recommender
from dragonrec.registry import ModelVersion
from dragonrec.serve.schemas import FiltersIn

log = logging.getLogger("dragonrec.serve")

FALLBACK_VERSION = "popularity"
"""The version name of the pipeline without a model (no active registry version, or none loads)."""
ITEM_FIELDS = ("item_id", "title", "brand", "category", "price", "description")


class GrownCatalogModel:
    """A fitted recommender served over a catalog that grew after it was fitted (its catalog is a prefix)."""

    def __init__(self, model: Recommender, catalog: Catalog):
        base = model.catalog.item_ids
        if len(catalog) < len(base) or list(catalog.item_ids[:len(base)]) != list(base):
            raise ValueError(f"{model.name} was fitted on a catalog that is not a prefix of the served one")
        self.model, self.catalog, self.name = model, catalog, model.name
        self.n_base = len(base)

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, len(catalog)] float32: the model's scores, -inf for items it never knew."""
        n = len(self.catalog)
        if n == self.n_base:
            return self.model.score(histories, actions)
        out = np.full((len(histories), n), -np.inf, dtype=np.float32)
        keep = [np.asarray(h, dtype=np.int64) < self.n_base for h in histories]
        h = [np.asarray(hist, dtype=np.int64)[k] for hist, k in zip(histories, keep)]
        a = None if actions is None else [np.asarray(act, dtype=object)[k] for act, k in zip(actions, keep)]
        out[:, :self.n_base] = self.model.score(h, a)
        return out


class NewItemSlots(Reranker):
    """Exploration for new products. Models fitted before a product was added cannot score it, so it sinks
    below every scored candidate; up to `slots` of the new products among a request's candidates (proposed by
    dense retrieval, in its order) are moved to list positions `first`, `first + every`, ..."""

    def __init__(self, n_known: int, slots: int = 2, first: int = 2, every: int = 4):
        self.n_known, self.slots, self.first, self.every = n_known, slots, first, every

    def rerank(self, items: np.ndarray, scores: np.ndarray, banned: np.ndarray) -> np.ndarray:
        keep = super().rerank(items, scores, banned)
        is_new = items[keep] >= self.n_known
        if self.slots <= 0 or not is_new.any():
            return keep
        new = keep[is_new][:self.slots]
        out = [k for k in keep if k not in set(new.tolist())]
        for s, k in enumerate(new):
            out.insert(min(self.first + s * self.every, len(out)), int(k))
        return np.asarray(out, dtype=np.int64)


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
                   embedder: Embedder | None = None, new_item_slots: int = 2) -> tuple[Pipeline, str]:
    """The union pipeline over `state.catalog`: dense retrieval, co-occurrence, the model's own top K and
    popularity, scored by the model; without a model, the same sources minus the model in fused retrieval
    order. Co-occurrence and the model are fitted already (on the dataset's catalog, a prefix of this one);
    products added since get up to `new_item_slots` places in a list when dense retrieval proposes them."""
    catalog = state.catalog
    reranker = NewItemSlots(len(cooccurrence.catalog), slots=new_item_slots)
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
        pipe = Pipeline(cfg, model=GrownCatalogModel(model, catalog), sources={"cooccurrence": cooc},
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


# -- catalog rows, filters, diversity ------------------------------------------------------------------------------------------------
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


def filtered_out(st: CatalogState, filters: FiltersIn | None) -> np.ndarray:
    """Catalog indices the request's business filters leave out."""
    if filters is None:
        return np.zeros(0, np.int64)
    keep = np.ones(len(st.catalog), dtype=bool)
    if filters.categories:
        wanted = [c.lower() for c in filters.categories]
        keep &= np.fromiter((any(w in c for w in wanted) for c in st.categories), bool, len(st.catalog))
    if filters.exclude_categories:
        unwanted = [c.lower() for c in filters.exclude_categories]
        keep &= np.fromiter((not any(w in c for w in unwanted) for c in st.categories), bool, len(st.catalog))
    if filters.brands:
        keep &= np.isin(st.brands, [b.lower() for b in filters.brands])
    prices = st.prices
    if filters.min_price is not None:
        keep &= np.nan_to_num(prices, nan=-np.inf) >= filters.min_price
    if filters.max_price is not None:
        keep &= np.nan_to_num(prices, nan=np.inf) <= filters.max_price
    out = np.flatnonzero(~keep)
    if filters.exclude:
        out = np.concatenate([out, [st.catalog.index_of(i) for i in filters.exclude if i in st.catalog]])
    return out.astype(np.int64)


def diversify(recs: Recommendations, categories: np.ndarray, n: int, weight: float) -> list:
    """Greedy category spread: each next pick maximises (1 - weight) * relevance - weight * (share of the
    list so far in its category), relevance falling linearly with the pipeline's rank."""
    items = list(recs)
    if not items:
        return []
    m = len(items)
    relevance = 1.0 - np.arange(m) / m
    cats = [categories[r.idx] or f"#{r.idx}" for r in items]  # no category: its own
    counts: Counter = Counter()
    left = list(range(m))
    out = []
    while left and len(out) < n:
        share = np.asarray([counts[cats[j]] for j in left], dtype=np.float64) / max(len(out), 1)
        best = left[int(np.argmax((1 - weight) * relevance[left] - weight * share))]
        out.append(items[best])
        counts[cats[best]] += 1
        left.remove(best)
    return out


def finite(x: float) -> float:
    return float(x) if np.isfinite(x) else -1e30
