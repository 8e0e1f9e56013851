"""Candidate sources behind one interface (dense retrieval, any model's own top-K, popularity) and their union.

    dense = DenseSource(DenseConfig(cache_dir=".cache/embeddings")).fit(train, catalog)
    cands = dense.candidates(histories, actions, k=100, exclude=histories)    # items [B, k] (-1 pads), scores
    union = union_candidates({"dense": cands, "model": model_cands}, {"dense": 100, "model": 100})
    dense.update_catalog(new_catalog)   # embeds only new/edited item texts, updates the index in place
    dense.save(path); DenseSource.load(path, catalog, embedder)

A model-backed source takes any fitted object with `.score(histories, actions) -> [B, n_catalog]` (every
dragonrec Recommender has it), so this module never imports `dragonrec.recommenders`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.candidates.dense import Candidates, DenseRetriever
from dragonrec.candidates.query import Preferences, QueryConfig, preference_vector, query_vector
from dragonrec.data.catalog import Catalog
from dragonrec.data.stats import item_popularity
from dragonrec.embed import Embedder, default_embedder, embed_catalog, embed_texts
from dragonrec.index import IndexConfig, VectorIndex
from dragonrec.text import TextTemplate, catalog_texts


class ScoresItems(Protocol):
    """What a model-backed source needs of a model: a fitted dragonrec Recommender has it."""

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray: ...


class CandidateSource(ABC):
    """Proposes up to k catalog indices per history, best first, never an item of `exclude[b]`.

    `scores` gives the source's own score for every catalog item (-inf = never proposed); the default
    `candidates` is its top k. `preferences[b]` (stated preferences) is used by sources that can read them.
    """

    name: str = "source"
    reason: str = "proposed by a candidate source"  # one line shown beside the items it proposes

    def fit(self, train: pd.DataFrame, catalog: Catalog) -> Self:
        self.n_items = len(catalog)
        return self

    @abstractmethod
    def scores(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None,
               preferences: Sequence[Preferences | None] | None = None) -> np.ndarray:
        """[B, n_catalog] float32, higher is better; -inf where the source has nothing to say."""

    def candidates(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None,
                   k: int = 100, exclude: Sequence[np.ndarray] | None = None,
                   preferences: Sequence[Preferences | None] | None = None,
                   scores: np.ndarray | None = None) -> Candidates:
        """Top k per row: items [B, k] (-1 pads) and scores [B, k] (-inf pads). `scores`: this source's own
        `scores()` for the same rows when the caller already has them (saves a second model pass)."""
        full = self.scores(histories, actions, preferences) if scores is None else scores
        return top_k(full, k, exclude)

    def update_catalog(self, catalog: Catalog) -> dict[str, int]:
        """Follow a changed catalog (items added, removed, edited) without a refit; returns counts of what the
        source redid (e.g. {"changed": n} re-embedded items). A source whose state cannot follow (a fitted
        model's scores are by the old catalog's indices) raises; refit it instead."""
        raise NotImplementedError(f"the {self.name!r} source cannot follow a catalog change: refit it")

    @property
    def follows_catalog(self) -> bool:
        """Whether `update_catalog` is implemented (checked before any source is changed)."""
        return type(self).update_catalog is not CandidateSource.update_catalog


def remap_by_id(values: np.ndarray, old_ids: Sequence[str], new_ids: Sequence[str], fill: float = 0.0) -> np.ndarray:
    """Per-item `values` (aligned with `old_ids`) re-aligned with `new_ids`; new items get `fill`."""
    values = np.asarray(values)
    pos = {item_id: i for i, item_id in enumerate(old_ids)}
    out = np.full((len(new_ids), *values.shape[1:]), fill, dtype=values.dtype)
    pairs = [(j, pos[i]) for j, i in enumerate(new_ids) if i in pos]
    if pairs:
        new_pos, old_pos = map(list, zip(*pairs))
        out[new_pos] = values[old_pos]
    return out


def top_k(scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> Candidates:
    """The k best finite scores per row, best first; ties go to the lower catalog index, so a row gives the
    same answer alone or in any batch. Items of `exclude[b]` are skipped."""
    s = np.array(scores, dtype=np.float32)  # a copy: exclusions are written into it
    s[np.isnan(s)] = -np.inf
    B, n = s.shape
    if exclude is not None:
        for b, e in enumerate(exclude):
            if e is not None and len(e):
                s[b, np.asarray(e, dtype=np.int64)] = -np.inf
    k = min(k, n)
    items = np.full((B, max(k, 0)), -1, np.int64)
    vals = np.full((B, max(k, 0)), -np.inf, np.float32)
    if k <= 0 or B == 0:
        return Candidates(items, vals)
    # Per row, a few O(n) passes (a request's row can span a million items): argpartition finds the k-th
    # largest score; the items above it and the lowest-index ties at it are the top k.
    for b in range(B):
        row = s[b]
        kth = row[np.argpartition(row, n - k)[n - k:]].min()
        if kth == -np.inf:
            chosen = np.flatnonzero(row > -np.inf)
        else:
            above = np.flatnonzero(row > kth)
            chosen = np.concatenate([above, np.flatnonzero(row == kth)[:k - len(above)]])
        chosen = chosen[np.lexsort((chosen, -row[chosen]))]  # by score, then index
        items[b, :len(chosen)], vals[b, :len(chosen)] = chosen, row[chosen]
    return Candidates(items, vals)


class ModelSource(CandidateSource):
    """The top K of any fitted model's `score()`: the generative model, co-occurrence, SASRec, ..."""

    def __init__(self, model: ScoresItems, name: str | None = None, reason: str | None = None):
        self.model = model
        self.name = name or getattr(model, "name", "model")
        self.reason = reason or f"ranked high by {self.name}"

    def fit(self, train: pd.DataFrame, catalog: Catalog) -> Self:
        """The model is fitted already (so a trained generative model is never trained twice)."""
        return super().fit(train, catalog)

    def scores(self, histories, actions=None, preferences=None) -> np.ndarray:
        out = np.asarray(self.model.score(list(histories), None if actions is None else list(actions)),
                         dtype=np.float32)
        if out.shape != (len(histories), self.n_items):
            raise ValueError(f"{self.name} scored {out.shape}, expected {(len(histories), self.n_items)}")
        return out


class PopularitySource(CandidateSource):
    """The items most training users showed interest in (positive events), the same list for everyone."""

    name = "popularity"
    reason = "popular with shoppers"

    def __init__(self, distinct_users: bool = True, half_life_days: float | None = None):
        self.distinct_users = distinct_users
        self.half_life_days = half_life_days

    def fit(self, train: pd.DataFrame, catalog: Catalog) -> Self:
        super().fit(train, catalog)
        self.popularity = item_popularity(train, len(catalog), self.distinct_users, self.half_life_days)
        self.item_ids = catalog.item_ids.tolist()
        return self

    def update_catalog(self, catalog: Catalog) -> dict[str, int]:
        """Items keep their counts; new items start at zero."""
        new_ids = catalog.item_ids.tolist()
        self.popularity = remap_by_id(self.popularity, self.item_ids, new_ids)
        self.item_ids, self.n_items = new_ids, len(catalog)
        return {}

    def scores(self, histories, actions=None, preferences=None) -> np.ndarray:
        row = np.log1p(self.popularity).astype(np.float32)
        return np.broadcast_to(row, (len(histories), len(row))).copy()

    def candidates(self, histories, actions=None, k=100, exclude=None, preferences=None, scores=None) -> Candidates:
        # Everyone's list is the same ranking minus their exclusions: rank the catalog once (top_k's order:
        # score, then index), not per request (a full-catalog pass each on catalogs of millions).
        if scores is not None:
            return super().candidates(histories, actions, k, exclude, preferences, scores)
        if getattr(self, "_ranked_for", None) is not self.popularity:  # fit and update_catalog set a new array
            row = np.log1p(self.popularity).astype(np.float32)
            finite = np.flatnonzero(np.isfinite(row))
            self._ranked, self._row, self._ranked_for = finite[np.lexsort((finite, -row[finite]))], row, self.popularity
        ranked, row = self._ranked, self._row
        B = len(histories)
        k = min(k, len(row))
        out = Candidates(np.full((B, max(k, 0)), -1, np.int64), np.full((B, max(k, 0)), -np.inf, np.float32))
        for b in range(B):
            ex = np.zeros(0, np.int64) if exclude is None or exclude[b] is None else np.asarray(exclude[b], np.int64)
            head = ranked[:k + len(ex)]  # at most len(ex) of these are excluded
            head = head[~np.isin(head, ex)][:k]
            out.items[b, :len(head)], out.scores[b, :len(head)] = head, row[head]
        return out


class DenseConfig(BaseModel):
    """Dense retrieval: the user's weighted history (+ stated preferences) as one query vector into FAISS."""

    model_config = ConfigDict(frozen=True)

    query: QueryConfig = Field(default_factory=QueryConfig)
    """How history actions, recency and preferences become the query vector."""
    index: IndexConfig = Field(default_factory=IndexConfig)
    """The FAISS index (exact up to 200k items)."""
    template: TextTemplate = Field(default_factory=TextTemplate)
    """Which item fields make the embedded text."""
    cache_dir: str | None = ".cache/embeddings"
    """Embedding cache folder (only new or edited item texts are embedded); None = no disk cache."""


class DenseSource(CandidateSource):
    """Items whose text embedding is nearest the user's query vector (the RAG baseline's retrieval)."""

    name = "dense"
    reason = "similar to what you liked"

    def __init__(self, cfg: DenseConfig | None = None, embedder: Embedder | None = None,
                 item_vectors: np.ndarray | None = None):
        self.cfg = cfg or DenseConfig()
        self.embedder = embedder
        self.item_vectors = item_vectors  # precomputed [n_catalog, dim] unit rows, if any

    def fit(self, train: pd.DataFrame, catalog: Catalog) -> Self:
        super().fit(train, catalog)
        self.embedder = self.embedder or default_embedder()
        if self.item_vectors is None or len(self.item_vectors) != len(catalog):
            self.item_vectors = embed_catalog(catalog, cache_dir=self.cfg.cache_dir, template=self.cfg.template,
                                              embedder=self.embedder)
        self.item_vectors = np.ascontiguousarray(self.item_vectors, dtype=np.float32)
        self.index = VectorIndex.build(self.item_vectors, catalog.item_ids.tolist(), model=self.embedder.name,
                                       cfg=self.cfg.index)
        self._attach(catalog)
        return self

    def _attach(self, catalog: Catalog, texts: list[str] | None = None) -> None:
        """Point the retriever at `catalog` (the index already holds its items)."""
        self.catalog, self.n_items, self._texts = catalog, len(catalog), texts
        self.retriever = DenseRetriever(self.index, catalog.item_ids.tolist())

    def update_catalog(self, catalog: Catalog) -> dict[str, int]:
        """Follow a changed catalog without rebuilding the index: embed only new or edited item texts (the
        rest keep their vectors), add new items, remove gone ones, replace edited ones, all in place.
        Returns counts of added, removed and changed (edited) items."""
        old_ids, new_ids = self.catalog.item_ids.tolist(), catalog.item_ids.tolist()
        old_texts = self._texts if self._texts is not None else catalog_texts(self.catalog, self.cfg.template)
        texts = catalog_texts(catalog, self.cfg.template)
        old_pos = {item_id: i for i, item_id in enumerate(old_ids)}
        new_set = set(new_ids)
        gone = [i for i in old_ids if i not in new_set]
        redo = [j for j, (i, t) in enumerate(zip(new_ids, texts)) if i not in old_pos or old_texts[old_pos[i]] != t]
        fresh = embed_texts([texts[j] for j in redo], embedder=self.embedder, cache_dir=self.cfg.cache_dir)
        if gone:
            self.index.remove(gone)
        if redo:
            self.index.add(fresh, [new_ids[j] for j in redo])  # an id already present is replaced
        vectors = remap_by_id(self.item_vectors, old_ids, new_ids)
        vectors[redo] = fresh
        self.item_vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._attach(catalog, texts)
        added = sum(i not in old_pos for i in new_ids)
        return {"added": added, "removed": len(gone), "changed": len(redo) - added}

    def save(self, path: str | Path) -> None:
        """The index (with its metadata: item ids, embedding model), the item vectors and the config."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.index.save(path / "index")
        np.save(path / "item_vectors.npy", self.item_vectors)
        (path / "dense.json").write_text(self.cfg.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog, embedder: Embedder | None = None,
             cfg: DenseConfig | None = None) -> Self:
        """A saved source for `catalog` (the one it was saved with); `cfg` replaces the saved config. The
        index must have been built with `embedder`'s model (else: rebuild it)."""
        path = Path(path)
        if cfg is None:
            cfg = DenseConfig.model_validate_json((path / "dense.json").read_text())
        self = cls(cfg, embedder or default_embedder())
        self.index = VectorIndex.load(path / "index", model=self.embedder.name)
        self.item_vectors = np.load(path / "item_vectors.npy")
        if len(self.item_vectors) != len(catalog) or len(self.index) != len(catalog):
            raise ValueError(f"{path}: saved for a catalog of {len(self.item_vectors)} items, not {len(catalog)}")
        self._attach(catalog)
        return self

    def queries(self, histories, actions=None, preferences=None) -> tuple[np.ndarray, np.ndarray]:
        """([B, dim] unit query vectors, [B] bool has_query); rows without any positive signal are zero."""
        out = np.zeros((len(histories), self.item_vectors.shape[1]), dtype=np.float32)
        ok = np.zeros(len(histories), dtype=bool)
        for b, h in enumerate(histories):
            prefs = preferences[b] if preferences is not None else None
            pref_vec = preference_vector(prefs, self.embedder, self.cfg.cache_dir) if prefs is not None else None
            q = query_vector(np.asarray(h, dtype=np.int64), None if actions is None else actions[b],
                             self.item_vectors, self.cfg.query, pref_vec)
            if q is not None:
                out[b], ok[b] = q, True
        return out, ok

    def scores(self, histories, actions=None, preferences=None) -> np.ndarray:
        q, ok = self.queries(histories, actions, preferences)
        out = q @ self.item_vectors.T
        out[~ok] = -np.inf
        return out.astype(np.float32)

    def candidates(self, histories, actions=None, k=100, exclude=None, preferences=None, scores=None) -> Candidates:
        # the index, not a full product: IVF/HNSW keep this fast on catalogs of millions
        q, ok = self.queries(histories, actions, preferences)
        out = Candidates(np.full((len(histories), k), -1, np.int64), np.full((len(histories), k), -np.inf, np.float32))
        rows = np.flatnonzero(ok)
        if len(rows):
            found = self.retriever.retrieve(q[rows], k, None if exclude is None else [exclude[b] for b in rows])
            out.items[rows], out.scores[rows] = found.items, found.scores
        return out


@dataclass
class CandidateUnion:
    """The deduplicated union of several sources' candidates, per row in fused retrieval order.

    items [B, U] catalog indices (-1 pads); fused [B, U] reciprocal-rank-fusion scores (-inf pads);
    primary [B, U] position in `names` of the first source (by priority) that proposed the item (-1 pads);
    ranks [B, U, S] 1-based rank of the item in each source's list (0 = not proposed by that source).
    """

    names: list[str]
    items: np.ndarray
    fused: np.ndarray
    primary: np.ndarray
    ranks: np.ndarray

    def row(self, b: int) -> np.ndarray:
        """Positions of row b's real items (its pads dropped)."""
        return np.flatnonzero(self.items[b] >= 0)

    def sources_of(self, b: int, j: int) -> list[str]:
        """Every source that proposed item j of row b, in priority order."""
        return [self.names[s] for s in np.flatnonzero(self.ranks[b, j])]


def union_candidates(per_source: Mapping[str, Candidates], quotas: Mapping[str, int],
                     fusion_k: float = 60.0) -> CandidateUnion:
    """Each source's first `quotas[name]` candidates, deduplicated: an item belongs to the first source (in
    the order of `quotas`) that proposed it, and remembers every source that did.

    The union is ordered by reciprocal-rank fusion, sum over proposing sources of 1 / (fusion_k + rank)
    (Cormack et al. 2009), ties by priority: items several sources agree on rise, and a single source keeps
    its own order. This is the "retrieval order" a pipeline falls back to when its scorer fails.
    """
    names = [s for s in quotas if s in per_source]
    if not names:
        raise ValueError("no candidate source to unite")
    parts = [np.asarray(per_source[s].items)[:, :quotas[s]] for s in names]
    B = parts[0].shape[0]
    cat = np.concatenate(parts, axis=1)
    T = cat.shape[1]
    src = np.concatenate([np.full(p.shape[1], i) for i, p in enumerate(parts)]).astype(np.int64)
    rank = np.concatenate([np.arange(p.shape[1]) for p in parts]).astype(np.int64)
    cols = np.arange(T)
    valid = cat >= 0
    key = np.where(valid, cat, -1 - cols[None, :])  # pads get distinct keys, so they never merge
    # A stable sort groups each item's occurrences with the highest-priority one first.
    order = np.argsort(key, axis=1, kind="stable")
    sk = np.take_along_axis(key, order, axis=1)
    first = np.ones((B, T), dtype=bool)
    first[:, 1:] = sk[:, 1:] != sk[:, :-1]
    start = np.maximum.accumulate(np.where(first, cols[None, :], 0), axis=1)
    owner = np.empty((B, T), dtype=np.int64)  # column of the first occurrence of each column's item
    np.put_along_axis(owner, order, np.take_along_axis(order, start, axis=1), axis=1)
    rows = np.repeat(np.arange(B), T)
    v = valid.ravel()
    ranks = np.zeros((B, T, len(names)), dtype=np.int32)
    ranks[rows[v], owner.ravel()[v], np.tile(src, B)[v]] = np.tile(rank, B)[v] + 1
    fused = np.zeros(B * T, dtype=np.float64)
    np.add.at(fused, (rows * T + owner.ravel())[v], 1.0 / (fusion_k + np.tile(rank, B)[v] + 1.0))
    fused = fused.reshape(B, T)
    keep = valid & (owner == cols[None, :])
    pos = np.lexsort((np.broadcast_to(cols, (B, T)), np.where(keep, -fused, np.inf)), axis=1)
    U = int(keep.sum(axis=1).max()) if B else 0
    pos = pos[:, :U]
    kept = np.take_along_axis(keep, pos, axis=1)
    return CandidateUnion(
        names=names,
        items=np.where(kept, np.take_along_axis(cat, pos, axis=1), -1).astype(np.int64),
        fused=np.where(kept, np.take_along_axis(fused, pos, axis=1), -np.inf),
        primary=np.where(kept, src[pos], -1),
        ranks=np.take_along_axis(ranks, pos[:, :, None], axis=1) * kept[:, :, None],
    )


__all__ = ["CandidateSource", "CandidateUnion", "DenseConfig", "DenseSource", "ModelSource", "PopularitySource",
           "ScoresItems", "remap_by_id", "top_k", "union_candidates"]
