"""The RAG baseline: embed the catalog, retrieve top-K by the user's weighted history with FAISS, let a
scorer (an LLM, a local LM or another model) re-score them, recommend the top N.

    rag = RAGRecommender(RAGConfig(k=50), scorer=ModelScorer(cooc)).fit(split.train, catalog)
    rec = rag.recommend_for(history=[12, 40], actions=["view", "purchase"], n=10)   # items, reasons, degraded
    scores = rag.score(histories)   # [B, n_catalog] for full-ranking evaluation
    rag.update_catalog(new_catalog)  # embeds only new/edited items, updates the index in place
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from dragonrec.candidates.cold import ColdStart, ColdStartConfig
from dragonrec.candidates.dense import DenseRetriever
from dragonrec.candidates.query import (
    Preferences,
    QueryConfig,
    history_weights,
    preference_vector,
    query_vector,
    query_vectors,
)
from dragonrec.data.catalog import Catalog
from dragonrec.embed import Embedder, default_embedder, embed_catalog, embed_texts
from dragonrec.index import IndexConfig, VectorIndex
from dragonrec.recommenders.base import Recommender, _exclusions
from dragonrec.scorers.base import ItemView, Scorer, ScoreRequest, ScoreResult, ScorerStats, Usage
from dragonrec.text import TextTemplate, catalog_texts

# Candidates are placed above every non-candidate: retrieval similarities are cosines in [-1, 1] and the
# cold-start list lives in (-3, -2], so a candidate at CANDIDATE_BASE + (K - position) always wins.
CANDIDATE_BASE = 10.0


class RAGConfig(BaseModel):
    """The RAG pipeline's settings."""

    k: int = Field(50, ge=1, description="candidates retrieved and scored per user")
    exclude_history: bool = Field(True, description="never retrieve an item the user already has")
    scorer_history: int = Field(20, ge=0, description="latest history items shown to the scorer")
    query: QueryConfig = Field(default_factory=QueryConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    template: TextTemplate = Field(default_factory=TextTemplate)
    cache_dir: str | None = Field(None, description="embedding cache folder; None = no disk cache")
    scorer: str = Field("none", description="when no scorer object is given: 'none' (retrieval order), 'openai' "
                        "(DRAGONREC_LLM_* settings), 'hf:MODEL_DIR' (local causal LM) or 'model:NAME' (a dragonrec "
                        "recommender, e.g. model:cooccurrence, fitted on the same training data)")


@dataclass
class Recommendation:
    """One answered request."""

    items: list[str]  # item ids, best first
    indices: list[int]  # their catalog indices
    scores: list[float]  # the scorer's score (NaN where the order came from retrieval)
    reasons: list[str | None]  # "why this", one line each (None where the scorer gave none)
    source: str  # "history", "preferences", "history+preferences" or "cold_start"
    degraded: bool = False  # True when the scorer failed (fully or partly) and retrieval order was used
    degraded_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    usage: Usage = field(default_factory=Usage)


def make_scorer(spec: str, train: pd.DataFrame, catalog: Catalog, valid=None) -> Scorer | None:
    """The scorer a `RAGConfig.scorer` string names (see its description)."""
    kind, _, arg = spec.partition(":")
    if kind == "none":
        return None
    if kind == "openai":
        from dragonrec.scorers.openai_compat import LLMSettings, OpenAIScorer

        return OpenAIScorer(LLMSettings())
    if kind == "hf" and arg:
        from dragonrec.scorers.hf_local import HFLocalScorer, HFScorerConfig

        return HFLocalScorer(HFScorerConfig(model_dir=arg))
    if kind == "model" and arg:
        from dragonrec.recommenders import build
        from dragonrec.scorers.model import ModelScorer

        if arg == "rag":
            raise ValueError("a RAG scorer cannot be another RAG pipeline")
        return ModelScorer(build(arg).fit(train, catalog, valid=valid))
    raise ValueError(f"unknown scorer {spec!r}: use none, openai, hf:MODEL_DIR or model:NAME")


class RAGRecommender(Recommender):
    name = "rag"

    def __init__(self, cfg: RAGConfig | None = None, scorer: Scorer | None = None,
                 embedder: Embedder | None = None):
        self.cfg = cfg or RAGConfig()
        self.scorer = scorer  # None = retrieval order alone
        self.embedder = embedder
        self.last_usage = Usage()  # accumulated over the latest score() call
        self.scorer_stats = ScorerStats()  # requests answered / fallen back to retrieval order since reset_stats()

    def reset_stats(self) -> None:
        self.scorer_stats = ScorerStats()

    def stats(self) -> dict:
        """What the evaluation report prints: requests scored, how many degraded, and why."""
        return {"scorer": getattr(self.scorer, "name", "none"), **self.scorer_stats.to_dict()}

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None, item_vectors: np.ndarray | None = None) -> Self:
        """Embed the catalog (or take `item_vectors`), build the index, count popularity for cold start."""
        self.catalog = catalog
        if self.scorer is None:
            self.scorer = make_scorer(self.cfg.scorer, train, catalog, valid)
        self.embedder = self.embedder or default_embedder()
        if item_vectors is None:
            item_vectors = embed_catalog(catalog, cache_dir=self.cfg.cache_dir, template=self.cfg.template,
                                         embedder=self.embedder)
        if item_vectors.shape[0] != len(catalog):
            raise ValueError(f"{item_vectors.shape[0]} item vectors for a catalog of {len(catalog)}")
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.index = VectorIndex.build(self.item_vectors, catalog.item_ids.tolist(), model=self.embedder.name,
                                       cfg=self.cfg.index)
        self.retriever = DenseRetriever(self.index, catalog.item_ids.tolist())
        self.cold = ColdStart(self.cfg.cold_start).fit(train, len(catalog))
        self._texts = catalog_texts(catalog, self.cfg.template)
        return self

    def update_catalog(self, catalog: Catalog) -> dict[str, int]:
        """Follow a changed catalog without rebuilding the index: embed only new or edited item texts (the
        rest come from memory), add new items, remove gone ones, replace edited ones. New items have no
        popularity, so the cold-start list explores them. Returns counts of added/removed/changed items."""
        texts = catalog_texts(catalog, self.cfg.template)
        old_pos = {item_id: i for i, item_id in enumerate(self.catalog.item_ids.tolist())}
        new_ids = catalog.item_ids.tolist()
        new_set = set(new_ids)
        gone = [i for i in old_pos if i not in new_set]
        redo = [j for j, (i, t) in enumerate(zip(new_ids, texts)) if i not in old_pos or self._texts[old_pos[i]] != t]
        fresh = embed_texts([texts[j] for j in redo], embedder=self.embedder, cache_dir=self.cfg.cache_dir)
        if gone:
            self.index.remove(gone)
        if redo:
            self.index.add(fresh, [new_ids[j] for j in redo])  # an id already present is replaced
        vectors = np.zeros((len(catalog), self.item_vectors.shape[1]), dtype=np.float32)
        popularity = np.zeros(len(catalog))
        for j, item_id in enumerate(new_ids):
            if item_id in old_pos:
                vectors[j] = self.item_vectors[old_pos[item_id]]
                popularity[j] = self.cold.popularity[old_pos[item_id]]
        vectors[redo] = fresh
        was_explore = {self.catalog.item_ids[k] for k in self.cold.explore_pool}
        explore = np.asarray([j for j, i in enumerate(new_ids) if i not in old_pos or i in was_explore], dtype=np.int64)
        counts = {"added": sum(i not in old_pos for i in new_ids), "removed": len(gone),
                  "changed": sum(i in old_pos for i in (new_ids[j] for j in redo))}
        self.catalog, self.item_vectors, self._texts = catalog, vectors, texts
        self.cold.popularity, self.cold.explore_pool = popularity, explore
        self.retriever = DenseRetriever(self.index, new_ids)
        return counts

    # -- evaluation ---------------------------------------------------------------------------------------
    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, n_catalog]: the top-K candidates by the scorer's order above everything else; the rest by
        retrieval similarity; users without any positive signal get the cold-start list."""
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        q, has_query = query_vectors(histories, actions, self.item_vectors, self.cfg.query)
        out = q @ self.item_vectors.T  # exact similarities order everything below the candidates
        if (~has_query).any():
            out[~has_query] = self.cold.scores()
        rows = np.flatnonzero(has_query)
        if not len(rows):
            return out.astype(np.float32)
        excl = [histories[b] for b in rows] if self.cfg.exclude_history else None
        cand = self.retriever.retrieve(q[rows], self.cfg.k, excl)
        requests = [self._request(histories[b], None if actions is None else actions[b], *cand.row(i))
                    for i, b in enumerate(rows)]
        results = self._score_requests(requests)
        self.last_usage = Usage()
        for b, req, res in zip(rows, requests, results):
            idx = np.asarray([c.idx for c in req.candidates], dtype=np.int64)
            order = res.order(req.retrieval_scores)
            out[b, idx[order]] = CANDIDATE_BASE + (len(idx) - np.arange(len(idx), dtype=np.float32))
            self.last_usage += res.usage
        return out.astype(np.float32)

    def candidates(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None,
                   k: int | None = None) -> np.ndarray:
        """[B, k] retrieved catalog indices (-1 pads; cold users get the cold-start list), before scoring."""
        k = k or self.cfg.k
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        q, has_query = query_vectors(histories, actions, self.item_vectors, self.cfg.query)
        out = np.full((len(histories), k), -1, dtype=np.int64)
        rows = np.flatnonzero(has_query)
        if len(rows):
            excl = [histories[b] for b in rows] if self.cfg.exclude_history else None
            out[rows] = self.retriever.retrieve(q[rows], k, excl).items
        for b in np.flatnonzero(~has_query):
            rank = self.cold.ranking()
            rank = rank[~np.isin(rank, histories[b])][:k]
            out[b, :len(rank)] = rank
        return out

    # -- serving ------------------------------------------------------------------------------------------
    def recommend_for(self, history: Sequence[int] | np.ndarray = (), actions: Sequence[str] | None = None,
                      preferences: Preferences | dict | str | None = None, n: int = 10,
                      exclude: Sequence[int] | None = None, seed: int | None = None) -> Recommendation:
        """One request: history (catalog indices, oldest first) + actions + stated preferences -> top n with
        scores, reasons, a degraded flag and per-stage timings. `seed` varies the cold-start exploration."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        history = np.asarray(history, dtype=np.int64)
        if len(history) and (history.min() < 0 or history.max() >= len(self.catalog)):
            raise ValueError(f"history holds indices outside the catalog (0..{len(self.catalog) - 1})")
        acts = None if actions is None else np.asarray(actions, dtype=object)
        prefs = _as_preferences(preferences)
        pref_vec = preference_vector(prefs, self.embedder, self.cfg.cache_dir)
        q = query_vector(history, acts, self.item_vectors, self.cfg.query, pref_vec)
        timings["query_s"] = time.perf_counter() - t0
        banned = _exclusions(history if self.cfg.exclude_history else (), exclude)
        if q is None:
            rank = self.cold.ranking(seed=seed)
            rank = rank[~np.isin(rank, banned)][:n]
            timings["total_s"] = time.perf_counter() - t0
            return Recommendation(self.catalog.item_ids[rank].tolist(), rank.tolist(), [float("nan")] * len(rank),
                                  ["popular" if self.cold.popularity[i] > self.cfg.cold_start.rare_max_users
                                   else "new or rarely seen" for i in rank], "cold_start", timings=timings)
        t1 = time.perf_counter()
        items, sims = self.retriever.retrieve(q[None], max(self.cfg.k, n), [banned]).row(0)
        timings["retrieve_s"] = time.perf_counter() - t1
        source = "+".join(s for s, on in (("history", (self._weights_positive(history, acts))),
                                           ("preferences", pref_vec is not None)) if on)
        t2 = time.perf_counter()
        req = self._request(history, acts, items, sims, prefs)
        res = self._score_requests([req])[0]
        timings["score_s"] = time.perf_counter() - t2
        order = res.order(sims)[:n]
        timings["total_s"] = time.perf_counter() - t0
        return Recommendation(self.catalog.item_ids[items[order]].tolist(),
                              items[order].tolist(), res.scores[order].astype(float).tolist(),
                              [res.reasons[i] for i in order], source, res.degraded, res.degraded_reason,
                              timings, res.usage)

    # -- helpers ------------------------------------------------------------------------------------------
    def _weights_positive(self, history: np.ndarray, actions) -> bool:
        return bool((history_weights(history, actions, self.cfg.query)[1] > 0).any())

    def _request(self, history: np.ndarray, actions, items: np.ndarray, sims: np.ndarray,
                 prefs: Preferences | None = None) -> ScoreRequest:
        m = self.cfg.scorer_history
        hist = history[-m:] if m else history[:0]
        if actions is None or not len(hist):
            acts = [None] * len(hist)
        else:
            acts = list(np.asarray(actions, dtype=object)[-len(hist):])
        return ScoreRequest(
            history=[ItemView(int(i), self._texts[i], None if a is None else str(a)) for i, a in zip(hist, acts)],
            candidates=[ItemView(int(i), self._texts[i]) for i in items],
            preferences=prefs, retrieval_scores=np.asarray(sims, dtype=np.float32))

    def _score_requests(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        if self.scorer is None:
            # retrieval order alone: not a failure, so not degraded
            return [ScoreResult(np.asarray(r.retrieval_scores, dtype=np.float32), [None] * len(r.candidates))
                    for r in requests]
        results = self.scorer.score_batch(requests)
        if len(results) != len(requests) or any(len(res.scores) != len(r.candidates)
                                                for res, r in zip(results, requests)):
            raise RuntimeError(f"scorer {self.scorer.name} answered a different number of requests or candidates")
        for res in results:
            self.scorer_stats.add(res)
        return results

    def save(self, path: Path) -> None:
        """The index (with its metadata), item vectors and config; the scorer is supplied again on load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.index.save(path / "index")
        np.save(path / "item_vectors.npy", self.item_vectors)
        np.save(path / "popularity.npy", self.cold.popularity)
        np.save(path / "explore_pool.npy", self.cold.explore_pool)
        (path / "config.json").write_text(self.cfg.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path, catalog: Catalog, scorer: Scorer | None = None,
             embedder: Embedder | None = None) -> Self:
        path = Path(path)
        self = cls(RAGConfig.model_validate_json((path / "config.json").read_text()), scorer, embedder)
        self.embedder = self.embedder or default_embedder()
        self.catalog = catalog
        self.index = VectorIndex.load(path / "index", model=self.embedder.name)
        self.item_vectors = np.load(path / "item_vectors.npy")
        if len(self.item_vectors) != len(catalog):
            raise ValueError(f"{path}: saved for a catalog of {len(self.item_vectors)} items, not {len(catalog)}")
        self.retriever = DenseRetriever(self.index, catalog.item_ids.tolist())
        self.cold = ColdStart(self.cfg.cold_start)
        self.cold.popularity = np.load(path / "popularity.npy")
        self.cold.explore_pool = np.load(path / "explore_pool.npy")
        self._texts = catalog_texts(catalog, self.cfg.template)
        return self


def _as_preferences(p: Preferences | dict | str | None) -> Preferences | None:
    if p is None or isinstance(p, Preferences):
        return p
    if isinstance(p, str):
        return Preferences(text=p)
    if isinstance(p, dict):
        return Preferences.model_validate(p)
    raise TypeError(f"preferences must be Preferences, a dict or a string, not {type(p).__name__}")
