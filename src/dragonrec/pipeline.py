"""The recommendation pipeline: history (+ context) -> candidate sources -> union -> scorer -> re-rank -> an
ordered list, each item with its score, the source that proposed it and a one-line reason. One object answers
full-ranking evaluation (`score`, batched) and single online requests (`recommend_for`), so what we measure
is what we serve.

    pipe = Pipeline(PipelineConfig.union(), model=fitted_generative).fit(split.train, catalog)
    scores = pipe.score(histories, actions)      # [B, n_catalog] float32, for evaluate_cases
    recs = pipe.recommend_for(history, actions, n=10, context={"cart": ["B00X"], "preferences": "vegan"})
    recs.items, recs.scores, recs.reasons, recs.source, recs.degraded, recs.timings, recs.usage
    pipe.stats()                                  # requests, cold, scored, degraded and why; reset_stats()
    pipe.update_catalog(new_catalog)              # sources follow a changed catalog without a refit

    dragonrec evaluate --data DIR --recommender pipeline --set 'sources={"dense": 500}' --set rest=dense \
        --set scorer=model:cooccurrence          # the RAG baseline as a pipeline (`--recommender rag`:
                                                 # the same with the RAG settings, dragonrec.rag)
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import ClassVar, Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dragonrec.candidates.cold import ColdStart, ColdStartConfig
from dragonrec.candidates.complements import ComplementsConfig, ComplementsSource
from dragonrec.candidates.query import Preferences, QueryConfig
from dragonrec.candidates.sources import (
    CandidateSource,
    CandidateUnion,
    DenseConfig,
    DenseSource,
    ModelSource,
    PopularitySource,
    remap_by_id,
    union_candidates,
)
from dragonrec.data.catalog import Catalog
from dragonrec.embed import Embedder
from dragonrec.recommenders import build
from dragonrec.recommenders.base import Recommender
from dragonrec.rerank import DiversityReranker, Filters, RerankConfig, Reranker, RerankRequest
from dragonrec.schema import Action, parse_action, positive_mask
from dragonrec.scorers.base import ItemViews, Scorer, ScoreRequest, ScoreResult, Usage, item_indices
from dragonrec.text import catalog_texts

DEFAULT_QUOTAS: dict[str, int] = {"dense": 100, "cooccurrence": 100, "model": 100, "popularity": 50}

# The one-line "why" of an item, by the source that proposed it (a scorer's own reason takes precedence).
SOURCE_REASONS: dict[str, str] = {
    "dense": "similar to what you liked",
    "cooccurrence": "often bought next after items in your history",
    "popularity": "popular with shoppers",
    "complements": "goes with items you picked",
    "cold_start": "new or rarely seen: worth a look",
}


class PipelineConfig(BaseModel):
    """Which candidate sources (and how many candidates each), which scorer, and how the list is finished."""

    sources: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    """Source -> candidates it proposes, in priority order: 'dense', 'popularity', 'model' or a recommender name."""
    model: str = "generative"
    """Recommender behind the 'model' source and the 'model' scorer (fitted here unless one is handed in)."""
    model_dir: str | None = None
    """A saved model of that recommender to load instead of fitting one (evaluate checks its provenance)."""
    overrides: dict[str, dict] = Field(default_factory=dict)
    """Config overrides of recommender-backed parts by source name ('model' too): {"cooccurrence": {...}}."""
    scorer: str = "model"
    """'none' (fused retrieval order), 'model' (the pipeline's model), 'model:NAME', 'openai' or 'hf:MODEL_DIR'."""
    rest: str | None = "model"
    """Source whose full-catalog scores order everything below the list (None: -inf); fills short lists."""
    fusion_k: float = Field(60.0, gt=0)
    """Reciprocal-rank fusion constant: retrieval score = sum over proposing sources of 1/(fusion_k + rank)."""
    exclude_history: bool = True
    """Never propose an item the user already has (the cart and the page's item are always excluded)."""
    scorer_history: int = Field(50, ge=0)
    """Latest history events shown to the scorer (LLM scorers cut further with their own settings)."""
    dense: DenseConfig = Field(default_factory=DenseConfig)
    """The dense retrieval source: query weights, index, item text template, embedding cache."""
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    """The list for users with no positive event and no stated preferences."""
    reason_chars: int = Field(80, ge=10)
    """Degraded-request reasons are counted by their first this-many characters."""
    rerank: RerankConfig | None = None
    """Shop rules, diversity, category caps and calibration (dragonrec.rerank); None = only drop banned items."""
    scorer_timeout_s: float | None = Field(None, gt=0)
    """The scorer's time budget per call (an LLM scorer can be slow): past it the request answers at once,
    ranked by the `rest` source's scores (the model's, in the union pipeline; retrieval order without one),
    marked degraded with the reason. The late answer is dropped. None: wait for the scorer."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.sources:
            raise ValueError("a pipeline needs at least one candidate source")
        bad = {k: v for k, v in self.sources.items() if v < 1}
        if bad:
            raise ValueError(f"source quotas must be >= 1, got {bad}")
        if self.rest is not None and self.rest not in self.sources:
            raise ValueError(f"rest={self.rest!r} is not one of the sources {list(self.sources)}")
        return self

    @classmethod
    def rag(cls, k: int = 50, scorer: str = "none", **fields) -> PipelineConfig:
        """The RAG baseline: dense retrieval alone, `scorer` over its top k, retrieval similarity below."""
        return cls(sources={"dense": k}, scorer=scorer, rest="dense", **fields)

    @classmethod
    def union(cls, quotas: Mapping[str, int] | None = None, model: str = "generative", scorer: str = "model",
              rest: str | None = "model", **fields) -> PipelineConfig:
        """The union of dense, co-occurrence, the model's own top-K and popularity, scored by the model."""
        return cls(sources=dict(quotas or DEFAULT_QUOTAS), model=model, scorer=scorer, rest=rest, **fields)


class RequestContext(BaseModel):
    """What an online request knows beyond the history: the page's item, the cart, stated preferences."""

    model_config = ConfigDict(extra="forbid")

    item_id: str | None = None
    """The item on the current page: read as the latest event (a view) and never recommended."""
    cart: list[str] = Field(default_factory=list)
    """Item ids in the cart: read as add-to-cart events and never recommended."""
    preferences: Preferences | str | None = None
    """What the user told us: free text and/or categories (a string is free text)."""
    exclude: list[str] = Field(default_factory=list)
    """Item ids never to recommend (out of stock, already shown, ...)."""
    diversity: float | None = Field(None, ge=0.0, le=1.0)
    """MMR lambda for this request, 0 (relevance order) .. 1; None = the re-rank config's."""
    filters: Filters | None = None
    """Business filters for this request: categories, brands, price range."""

    def prefs(self) -> Preferences | None:
        p = Preferences(text=self.preferences) if isinstance(self.preferences, str) else self.preferences
        return None if p is None or p.is_empty() else p


@dataclass(frozen=True)
class Recommended:
    """One recommended item."""

    item_id: str
    idx: int  # catalog index
    score: float  # the scorer's score; the fused retrieval score where the scorer gave none
    source: str  # the first source (by priority) that proposed it, or "popularity"/"cold_start"/the rest source
    reason: str  # one line: why this item
    sources: tuple[str, ...] = ()  # every source that proposed it as a candidate (empty: cold list or fill)


class Recommendations(list):
    """A list of `Recommended`, best first, plus how the request went: `source` (what the list was drawn
    from: "history", "preferences", "history+preferences" or "cold_start"), a degraded scorer and why,
    seconds per stage, the scorer's usage (requests, tokens, cost). `items`, `indices`, `scores` and
    `reasons` are the columns of the list."""

    def __init__(self, items: Iterable[Recommended] = (), *, cold: bool = False, source: str | None = None,
                 degraded: bool = False, degraded_reason: str | None = None,
                 timings: dict[str, float] | None = None, usage: Usage | None = None):
        super().__init__(items)
        self.cold = cold
        self.source = source or ("cold_start" if cold else "history")
        self.degraded = degraded
        self.degraded_reason = degraded_reason
        self.timings = timings or {}
        self.usage = usage or Usage()

    @property
    def items(self) -> list[str]:
        """Item ids, best first."""
        return [r.item_id for r in self]

    @property
    def indices(self) -> list[int]:
        return [r.idx for r in self]

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self]

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self]


@dataclass
class PipelineStats:
    """Counters over this pipeline's requests since the last reset (an evaluation's rows count one each)."""

    requests: int = 0
    cold: int = 0  # answered by the cold-start list
    scored: int = 0  # sent to the scorer
    degraded: int = 0  # the scorer failed (retrieval order used) or answered only in part
    degraded_reasons: Counter = field(default_factory=Counter)

    def as_dict(self, top: int = 10) -> dict:
        return {"requests": self.requests, "cold": self.cold, "scored": self.scored, "degraded": self.degraded,
                "degraded_share": self.degraded / self.scored if self.scored else 0.0,
                "degraded_reasons": dict(self.degraded_reasons.most_common(top))}


@dataclass
class _Ranked:
    """One request's ranked candidates (internal): final order, display scores, provenance."""

    items: np.ndarray  # [m] catalog indices, best first
    scores: np.ndarray  # [m] scorer score, or fused retrieval score where the scorer gave none
    primary: np.ndarray  # [m] index into the union's source names
    ranks: np.ndarray  # [m, S] 1-based rank in each source (0 = not proposed)
    reasons: list[str | None] | None  # the scorer's reasons, aligned with items
    degraded: bool = False
    degraded_reason: str | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def cold(self) -> bool:
        return not len(self.items)


class Pipeline(Recommender):
    """Candidates from several sources -> one scorer -> a re-ranker, behind the Recommender contract.

    Build it from a config alone (every part is fitted in `fit`), or hand in fitted parts: `model` (the
    recommender behind the 'model' source and scorer, e.g. a trained generative model), `scorer`, `sources`
    (CandidateSource objects by name, replacing the built ones), `embedder` (for dense retrieval), `reranker`.
    """

    name: ClassVar[str] = "pipeline"

    def __init__(self, cfg: PipelineConfig | None = None, model: Recommender | None = None,
                 scorer: Scorer | None = None, sources: Mapping[str, CandidateSource] | None = None,
                 embedder: Embedder | None = None, reranker: Reranker | None = None):
        self.cfg = cfg or PipelineConfig()
        self.model = model
        self.scorer = scorer
        self.given_sources = dict(sources or {})
        self.embedder = embedder
        self.reranker = reranker or (Reranker() if self.cfg.rerank is None else DiversityReranker(self.cfg.rerank))
        self.counters = PipelineStats()
        self.last_usage = Usage()  # the scorer's usage over the latest score() call
        self._lock = threading.Lock()
        self._texts: list[str] | None = None
        # Set by dragonrec.serve.batching.batch_pipeline: concurrent recommend_for calls then share one
        # pass of every stage (`rank_rows`); None: each request ranks alone.
        self.rank_batcher = None

    # -- fitting ------------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        """Fit every source, the model and the scorer that were not handed in, and the cold-start list. A
        recommender used twice (e.g. the generative model as source and scorer) is fitted once."""
        self.catalog = catalog
        self._texts = None
        # Fitted recommenders by (name, overrides): a model used twice (source and scorer) is fitted once.
        fitted: dict[tuple[str, str], Recommender] = {}
        if self.model is None and self.cfg.model_dir is not None:
            from pathlib import Path

            from dragonrec.recommenders import recommender_class

            self.model = recommender_class(self.cfg.model).load(Path(self.cfg.model_dir), catalog)
        if self.model is not None:
            fitted[_part_key(self.cfg.model, self.cfg.overrides.get("model"))] = self.model

        def recommender(name: str, role: str) -> Recommender:
            """`role`: "model" for the pipeline's model, else the source name (whose overrides apply)."""
            if name in ("pipeline", "rag"):
                raise ValueError(f"a pipeline cannot use the {name!r} recommender as a part")
            if role == "model" and self.model is not None:
                return self.model
            over = self.cfg.overrides.get(role) or None
            key = _part_key(name, over)
            if key not in fitted:
                fitted[key] = build(name, over).fit(train, catalog, valid=valid)
            return fitted[key]

        self.sources: dict[str, CandidateSource] = {}
        for key in self.cfg.sources:
            if key in self.given_sources:
                src = self.given_sources[key]
            elif key == "dense":
                src = DenseSource(self.cfg.dense, embedder=self.embedder)
            elif key == "popularity":
                src = PopularitySource()
            elif key == "complements":
                src = ComplementsSource(ComplementsConfig(**(self.cfg.overrides.get("complements") or {})))
            elif key == "model":
                m = recommender(self.cfg.model, "model")
                src = ModelSource(m, name="model", reason=f"{m.name} predicts it next")
            else:
                src = ModelSource(recommender(key, key), name=key, reason=SOURCE_REASONS.get(key))
            src.name = key  # a source is named by its config key everywhere (stats, Recommended.source)
            self.sources[key] = src.fit(train, catalog)
        if "model" in self.cfg.sources or self.cfg.scorer == "model":
            self.model = recommender(self.cfg.model, "model")
        if self.scorer is None:
            self.scorer = self._make_scorer(self.cfg.scorer, recommender, train, catalog, valid)
        self.cold = ColdStart(self.cfg.cold_start).fit(train, len(catalog))
        self._cold_scores = self.cold.scores()
        self._fit_reranker(catalog)
        self.reset_stats()
        return self

    def _fit_reranker(self, catalog: Catalog) -> None:
        """A DiversityReranker reads the catalog and the item text vectors (the dense source's, or embedded
        with its settings: cached on disk)."""
        if not isinstance(self.reranker, DiversityReranker):
            return
        dense = self.sources.get("dense")
        vectors = getattr(dense, "item_vectors", None)
        if vectors is None or len(vectors) != len(catalog):
            from dragonrec.embed import embed_catalog

            vectors = embed_catalog(catalog, cache_dir=self.cfg.dense.cache_dir, template=self.cfg.dense.template,
                                    embedder=self.embedder)
        self.reranker.fit(catalog, vectors, popularity=self.cold.popularity)

    def _make_scorer(self, spec: str, recommender, train, catalog, valid) -> Scorer | None:
        from dragonrec.scorers.model import ModelScorer

        kind, _, arg = spec.partition(":")
        if kind == "none":
            return None
        if kind == "model":
            # "model" and "model:<cfg.model>" are the pipeline's model; another name shares a source's fit
            name = arg or self.cfg.model
            return ModelScorer(recommender(name, "model" if name == self.cfg.model else name))
        return make_scorer(spec, train, catalog, valid)  # openai, hf:DIR

    def update_catalog(self, catalog: Catalog) -> dict[str, int]:
        """Follow a changed catalog without a refit: every source follows it (dense retrieval embeds only new
        or edited item texts and updates its index in place), items keep their popularity and new items join
        the cold-start exploration pool. Returns counts of added, removed and changed (edited) items.

        A part backed by a fitted model (a model source, a model scorer) scores by the old catalog's indices
        and cannot follow: refit the pipeline then (nothing is changed)."""
        stuck = [f"source {k!r}" for k, s in self.sources.items() if not s.follows_catalog]
        scorer_model = getattr(self.scorer, "model", None)
        old_cat = getattr(scorer_model, "catalog", None)
        if old_cat is not None and list(old_cat.item_ids) != list(catalog.item_ids):
            stuck.append(f"scorer {getattr(self.scorer, 'name', 'model')}")
        if stuck:
            raise ValueError(f"{', '.join(stuck)} cannot follow a catalog change: refit the pipeline")
        old_ids, new_ids = self.catalog.item_ids.tolist(), catalog.item_ids.tolist()
        changed = max([s.update_catalog(catalog).get("changed", 0) for s in self.sources.values()], default=0)
        old, new = set(old_ids), set(new_ids)
        was_explore = {old_ids[i] for i in self.cold.explore_pool}
        self.cold.popularity = remap_by_id(self.cold.popularity, old_ids, new_ids)
        self.cold.explore_pool = np.asarray([j for j, i in enumerate(new_ids) if i not in old or i in was_explore],
                                            dtype=np.int64)
        self.catalog, self._texts, self._cold_scores = catalog, None, self.cold.scores()
        self._fit_reranker(catalog)
        return {"added": len(new - old), "removed": len(old - new), "changed": changed}

    # -- counters -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The scorer's name; requests, cold, scored and degraded counts since the last reset, and the
        commonest degraded reasons."""
        scorer = "none" if self.scorer is None else getattr(self.scorer, "name", type(self.scorer).__name__)
        with self._lock:
            return {"scorer": scorer, **self.counters.as_dict()}

    def reset_stats(self) -> None:
        with self._lock:
            self.counters = PipelineStats()

    # -- the stages, batched ------------------------------------------------------------------------------
    def _rank(self, histories: list[np.ndarray], actions, banned: list[np.ndarray],
              preferences: list[Preferences | None] | None = None,
              timings: dict[str, float] | None = None,
              requests: list[RerankRequest] | None = None) -> tuple[list[_Ranked], np.ndarray | None]:
        """Every stage for a batch: ([B] ranked lists (empty = cold), [B, n] rest scores or None); `requests`
        tell the re-ranker each row's history, diversity and list length."""
        t0 = time.perf_counter()
        B, n = len(histories), len(self.catalog)
        prefs = preferences or [None] * B
        warm = np.asarray([_has_signal(h, None if actions is None else actions[b], prefs[b])
                           for b, h in enumerate(histories)], dtype=bool)
        out = [_Ranked(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 0), np.int32), None)
               for _ in range(B)]
        rest = None
        rows = np.flatnonzero(warm)
        if len(rows):
            h = [histories[b] for b in rows]
            a = None if actions is None else [actions[b] for b in rows]
            p = None if preferences is None else [prefs[b] for b in rows]
            ex = [banned[b] for b in rows]
            rest_w = None
            if self.cfg.rest is not None:
                rest_w = np.nan_to_num(self.sources[self.cfg.rest].scores(h, a, p).astype(np.float32),
                                       nan=-np.inf, posinf=np.finfo(np.float32).max)
                rest = np.full((B, n), -np.inf, dtype=np.float32)
                rest[rows] = rest_w
            per_source = {key: self.sources[key].candidates(h, a, quota, ex, p,
                                                            scores=rest_w if key == self.cfg.rest else None)
                          for key, quota in self.cfg.sources.items()}
            # A user with stated preferences and no positive event yet: history-based sources and the scorer
            # would only replay their popularity prior (an empty history), so the preference query (dense)
            # alone orders the list.
            pref_only = np.asarray([not _has_signal(h[i], None if a is None else a[i], None) for i in range(len(h))])
            if pref_only.any() and "dense" in per_source:
                for key, c in per_source.items():
                    if key != "dense":
                        c.items[pref_only], c.scores[pref_only] = -1, -np.inf
            else:
                pref_only[:] = False
            union = union_candidates(per_source, self.cfg.sources, self.cfg.fusion_k)
            t1 = time.perf_counter()
            results = self._score_union(union, h, a, p, skip=pref_only, fallback=rest_w)
            t2 = time.perf_counter()
            for i, b in enumerate(rows):
                req = requests[b] if requests is not None else RerankRequest(
                    histories[b], None if actions is None else actions[b])
                out[b] = self._finish(union, i, results[i], banned[b], req)
            if timings is not None:
                timings.update(candidates_s=t1 - t0, score_s=t2 - t1, rerank_s=time.perf_counter() - t2)
        with self._lock:
            c = self.counters
            c.requests += B
            c.cold += sum(r.cold for r in out)
            for r in out:
                if r.degraded:
                    c.degraded += 1
                    c.degraded_reasons[(r.degraded_reason or "unknown")[:self.cfg.reason_chars]] += 1
        return out, rest

    def _score_union(self, union: CandidateUnion, histories, actions, prefs,
                     skip: np.ndarray | None = None, fallback: np.ndarray | None = None) -> list[ScoreResult | None]:
        """The scorer's answer per row (None = no scorer, nothing to score, or a `skip` row). Never raises for a
        scorer's failure: an exception or a malformed answer becomes a degraded result with the reason; a
        scorer over `cfg.scorer_timeout_s` is not waited for: `fallback` ([B, n_catalog], the rest source's
        scores) ranks those rows instead."""
        B = len(histories)
        if self.scorer is None:
            return [None] * B
        rows = [i for i in range(B) if len(union.row(i)) and not (skip is not None and skip[i])]
        requests = [self._request(histories[i], None if actions is None else actions[i],
                                  union.items[i, union.row(i)], union.fused[i, union.row(i)],
                                  None if prefs is None else prefs[i]) for i in rows]
        name = getattr(self.scorer, "name", type(self.scorer).__name__)
        try:
            results = self._call_scorer(requests) if requests else []
            if len(results) != len(requests):
                raise RuntimeError(f"answered {len(results)} results for {len(requests)} requests")
        except FutureTimeout:
            budget = f"{name} took longer than its {self.cfg.scorer_timeout_s} s budget"
            by = f"the model ({self.cfg.model})" if self.cfg.rest == "model" else f"the {self.cfg.rest} source"
            results = []
            for i, r in zip(rows, requests):
                if fallback is None:
                    results.append(ScoreResult.fallback(len(r.candidates), f"{budget}: retrieval order"))
                    continue
                s = fallback[i, item_indices(r.candidates)].astype(np.float32)
                results.append(ScoreResult(np.where(np.isfinite(s), s, np.nan).astype(np.float32),
                                           [None] * len(s), True, f"{budget}: ranked by {by}"))
        except Exception as e:  # noqa: BLE001 - a scorer must never take the request down: retrieval order
            results = [ScoreResult.fallback(len(r.candidates), f"{name} failed: {type(e).__name__}: {e}")
                       for r in requests]
        for j, (req, res) in enumerate(zip(requests, results)):
            if not isinstance(res, ScoreResult) or len(res.scores) != len(req.candidates):
                got = len(res.scores) if isinstance(res, ScoreResult) else type(res).__name__
                results[j] = ScoreResult.fallback(len(req.candidates), f"{name} answered {got} scores for "
                                                  f"{len(req.candidates)} candidates")
        with self._lock:
            self.counters.scored += len(requests)
        out: list[ScoreResult | None] = [None] * B
        for i, res in zip(rows, results):
            out[i] = res
        return out

    def _call_scorer(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """The scorer's answers; with a time budget the call runs on a worker thread and raises
        FutureTimeout past it (the request goes on without it; a call not started yet is cancelled)."""
        if self.cfg.scorer_timeout_s is None:
            return list(self.scorer.score_batch(requests))
        future = _scorer_pool().submit(lambda: list(self.scorer.score_batch(requests)))
        try:
            return future.result(timeout=self.cfg.scorer_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise

    def _request(self, history, actions, items, fused, prefs) -> ScoreRequest:
        m = self.cfg.scorer_history
        hist = np.asarray(history, dtype=np.int64)[-m:] if m else np.zeros(0, np.int64)
        acts = None if actions is None or not len(hist) else list(np.asarray(actions, object)[-len(hist):])
        texts = self.texts
        return ScoreRequest(history=ItemViews(hist, texts, acts), candidates=ItemViews(items, texts),
                            preferences=prefs, retrieval_scores=np.asarray(fused, dtype=np.float32))

    def _finish(self, union: CandidateUnion, i: int, res: ScoreResult | None, banned: np.ndarray,
                request: RerankRequest) -> _Ranked:
        """Scorer order (retrieval order where there is no scorer or it failed), then the re-ranker."""
        pos = union.row(i)  # already in fused retrieval order
        fused = union.fused[i, pos]
        if res is None:
            order, shown, reasons = np.arange(len(pos)), fused, None
        else:
            # Scored candidates first, the unscored after them in retrieval order: a failed request (no
            # scores) keeps the retrieval order; a partly answered one keeps the scores it got.
            order = res.order(fused)
            shown = np.where(np.isfinite(res.scores), res.scores, fused)
            reasons = [res.reasons[j] for j in order]
        few = self._content_first(union, i, pos[order], request)  # nearly cold users: content weighs more
        order = order[few]
        reasons = None if reasons is None else [reasons[j] for j in few]
        pos = pos[order]
        items = union.items[i, pos]
        if self.reranker.reads_sources:
            request = dataclasses.replace(request, sources=(union.names, union.ranks[i, pos]))
        keep = self.reranker.rerank_for(items, shown[order], banned, request)
        return _Ranked(items[keep], shown[order][keep].astype(np.float64), union.primary[i, pos][keep],
                       union.ranks[i, pos][keep], None if reasons is None else [reasons[j] for j in keep],
                       res is not None and res.degraded, None if res is None else res.degraded_reason,
                       Usage() if res is None else res.usage)

    @property
    def texts(self) -> list[str]:
        """Item texts as scorers see them (the dense source's template), computed on first use."""
        if self._texts is None:
            self._texts = catalog_texts(self.catalog, self.cfg.dense.template)
        return self._texts

    # -- offline: the Recommender contract ----------------------------------------------------------------
    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, n_catalog] float32: each row's final list above every other item, in list order; the rest in
        the order of the `rest` source's scores (-inf without one); users with no positive signal get the
        cold-start list. What `recommend_for` answers is the top of the same order."""
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        actions = None if actions is None else list(actions)
        requests = [RerankRequest(h, None if actions is None else actions[b]) for b, h in enumerate(histories)]
        ruled = [self.reranker.excluded(r) for r in requests]  # shop rules: out of every list and the rest
        banned = [np.union1d(h if self.cfg.exclude_history else np.zeros(0, np.int64), x)
                  for h, x in zip(histories, ruled)]
        ranked, rest = self._rank(histories, actions, banned, requests=requests)
        out = np.full((len(histories), len(self.catalog)), -np.inf, dtype=np.float32) if rest is None else rest
        self.last_usage = Usage()
        for b, r in enumerate(ranked):
            self.last_usage += r.usage
            if r.cold:
                out[b] = self._cold_scores
            else:
                finite = out[b][np.isfinite(out[b])]
                top = float(finite.max()) if len(finite) else 0.0
                # list position p of m gets top + 1 + (m - p): above every non-candidate, in list order
                out[b, r.items] = top + 1.0 + (len(r.items) - np.arange(len(r.items), dtype=np.float32))
            out[b, ruled[b]] = -np.inf
        return out

    def recommend(self, history: np.ndarray, n: int = 10, exclude: Iterable[int] | None = None,
                  exclude_history: bool = True, actions: np.ndarray | None = None,
                  context: RequestContext | dict | None = None) -> list[int]:
        """The contract's form of `recommend_for`: catalog indices only."""
        return [r.idx for r in self.recommend_for(history, actions, n, context, exclude=exclude,
                                                  exclude_history=exclude_history)]

    def candidates(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None,
                   k: int | None = None) -> np.ndarray:
        """[B, k] catalog indices before scoring, in fused retrieval order (-1 pads): the union of the sources'
        candidates, each source proposing its quota (k each when k is given; k defaults to the quotas' sum).
        Users without any positive signal (or with no candidate) get the cold-start list, history excluded."""
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        quotas = dict(self.cfg.sources) if k is None else dict.fromkeys(self.cfg.sources, k)
        k = k or sum(quotas.values())
        out = np.full((len(histories), k), -1, dtype=np.int64)
        warm = [b for b, h in enumerate(histories) if _has_signal(h, None if actions is None else actions[b], None)]
        if warm:
            h = [histories[b] for b in warm]
            a = None if actions is None else [actions[b] for b in warm]
            ex = [x if self.cfg.exclude_history else np.zeros(0, np.int64) for x in h]
            union = union_candidates({s: self.sources[s].candidates(h, a, q, ex) for s, q in quotas.items()},
                                     quotas, self.cfg.fusion_k)
            m = min(k, union.items.shape[1])
            out[warm, :m] = union.items[:, :m]
        cold = None
        for b in np.flatnonzero((out < 0).all(axis=1)):
            cold = self.cold.ranking() if cold is None else cold
            rank = cold[~np.isin(cold, histories[b])][:k]
            out[b, :len(rank)] = rank
        return out

    # -- online -------------------------------------------------------------------------------------------
    def recommend_for(self, history: Sequence[int] | np.ndarray = (), actions: Sequence[str] | None = None,
                      n: int = 10, context: RequestContext | dict | None = None,
                      exclude: Iterable[int] | None = None, exclude_history: bool | None = None,
                      seed: int | None = None) -> Recommendations:
        """One request: history (catalog indices, oldest first) + actions (any known spelling) + context ->
        the top n, each with score, source and reason. `exclude` (catalog indices) adds to context.exclude;
        `seed` varies the cold-start list's exploration order (default: the configured seed)."""
        t0 = time.perf_counter()
        ctx = context if isinstance(context, RequestContext) else RequestContext.model_validate(context or {})
        history = np.asarray(history, dtype=np.int64)
        if len(history) and (history.min() < 0 or history.max() >= len(self.catalog)):
            raise ValueError(f"history holds indices outside the catalog (0..{len(self.catalog) - 1})")
        acts = None
        if actions is not None:
            acts = np.asarray([parse_action(x).value for x in actions], dtype=object)
            if len(acts) != len(history):
                raise ValueError(f"history has {len(history)} events but {len(acts)} actions")
        # The cart and the page's item are the latest events: every source and the scorer read them.
        cart = self.catalog.indices(ctx.cart)
        here = self.catalog.indices([ctx.item_id] if ctx.item_id else [])
        extra = np.concatenate([cart, here])
        if len(extra):
            if acts is None:
                acts = np.full(len(history), QueryConfig().default_action, dtype=object)
            acts = np.concatenate([acts, np.asarray([Action.ADD_TO_CART.value] * len(cart)
                                                    + [Action.VIEW.value] * len(here), dtype=object)])
            history = np.concatenate([history, extra])
        skip_history = self.cfg.exclude_history if exclude_history is None else exclude_history
        request = RerankRequest(history, acts, ctx.diversity, ctx.filters, n)
        banned = np.unique(np.concatenate([history if skip_history else np.zeros(0, np.int64), extra,
                                           self.catalog.indices(ctx.exclude),
                                           np.asarray(list(exclude or []), dtype=np.int64),
                                           self.reranker.excluded(request)]))
        prefs = ctx.prefs()
        timings: dict[str, float] = {}
        if self._by_segment(history, acts, prefs):
            out = self._segment_list(prefs.categories, banned, n, seed)
            timings["total_s"] = time.perf_counter() - t0
            return Recommendations(out, cold=True, source="preferences", timings=timings)
        if self.rank_batcher is None:
            ranked, rest = self._rank([history], None if acts is None else [acts], [banned],
                                      None if prefs is None else [prefs], timings, [request])
            r = ranked[0]
        else:
            r, rest, stage_s = self.rank_batcher.submit([(history, acts, banned, prefs, request)])[0]
            timings.update(stage_s)
        if r.cold:
            out = self._cold_list(banned, n, seed)
            source = "cold_start"
        else:
            source = "+".join(s for s, on in (("history", _has_signal(history, acts, None)),
                                               ("preferences", prefs is not None)) if on)
            names = self.sources_names
            out = [self._recommended(int(r.items[j]), float(r.scores[j]), names[r.primary[j]],
                                     tuple(names[s] for s in np.flatnonzero(r.ranks[j])),
                                     None if r.reasons is None else r.reasons[j]) for j in range(min(n, len(r.items)))]
            if len(out) < n and rest is not None:
                out += self._rest_list(rest[0], np.concatenate([banned, r.items]), n - len(out))
        timings["total_s"] = time.perf_counter() - t0
        return Recommendations(out, cold=r.cold, source=source, degraded=r.degraded,
                               degraded_reason=r.degraded_reason, timings=timings, usage=r.usage)

    def rank_rows(self, rows: Sequence[tuple]) -> list[tuple[_Ranked, np.ndarray | None, dict[str, float]]]:
        """`_rank` for the rows (history, actions, banned, preferences, RerankRequest) of concurrent requests,
        in one pass per kind of row (with actions, without: sources read a missing action list differently):
        per row (ranked, [1, n] rest scores or None, the batch's stage seconds). A row's answer does not
        depend on the rows beside it."""
        out: list = [None] * len(rows)
        for with_actions in (True, False):
            idx = [i for i, row in enumerate(rows) if (row[1] is not None) == with_actions]
            if not idx:
                continue
            prefs = [rows[i][3] for i in idx]
            timings: dict[str, float] = {}
            ranked, rest = self._rank([rows[i][0] for i in idx], [rows[i][1] for i in idx] if with_actions else None,
                                      [rows[i][2] for i in idx], None if all(p is None for p in prefs) else prefs,
                                      timings, [rows[i][4] for i in idx])
            for j, i in enumerate(idx):
                out[i] = (ranked[j], None if rest is None else rest[j:j + 1], timings)
        return out

    @property
    def sources_names(self) -> list[str]:
        return [k for k in self.cfg.sources]

    def _recommended(self, idx: int, score: float, source: str, sources: tuple[str, ...],
                     scorer_reason: str | None) -> Recommended:
        if scorer_reason:
            reason = scorer_reason
        else:
            src = self.sources.get(source)
            reason = src.reason if src is not None else SOURCE_REASONS.get(source, f"proposed by {source}")
            others = [s for s in sources if s != source]
            if others:
                reason += f" (also from {', '.join(others)})"
        return Recommended(str(self.catalog.item_ids[idx]), idx, score, source, reason, sources)

    def _cold_list(self, banned: np.ndarray, n: int, seed: int | None = None) -> list[Recommended]:
        rank = self.cold.ranking(seed=seed)
        scores = self._cold_scores if seed is None else self.cold.scores(seed=seed)
        rank = rank[~np.isin(rank, banned)][:n]
        popular = self.cold.popularity[rank] > self.cfg.cold_start.rare_max_users
        return [self._recommended(int(i), float(scores[i]), "popularity" if p else "cold_start",
                                  (), None) for i, p in zip(rank, popular)]

    def _by_segment(self, history: np.ndarray, actions, prefs: Preferences | None) -> bool:
        """A cold user who stated categories only (no free text): popularity in those categories answers."""
        return (self.cfg.cold_start.segment and prefs is not None and bool(prefs.categories)
                and not (prefs.text and prefs.text.strip()) and not _has_signal(history, actions, None))

    def _segment_list(self, categories: list[str], banned: np.ndarray, n: int,
                      seed: int | None = None) -> list[Recommended]:
        """Popularity by segment: the most popular items whose category path holds one of `categories`
        (case-insensitive), exploration slots from the segment, then the overall cold list."""
        if getattr(self, "_paths_lower", None) is None or len(self._paths_lower) != len(self.catalog):
            self._paths_lower = [p.lower() for p in self.catalog.categories]
        wanted = [c.strip().lower() for c in categories if c.strip()]
        inside = np.fromiter((any(w in p for w in wanted) for p in self._paths_lower), bool, len(self.catalog))
        rank = self.cold.segment_ranking(inside, seed=seed)
        rank = rank[~np.isin(rank, banned)][:n]
        rare = self.cold.popularity[rank] <= self.cfg.cold_start.rare_max_users
        label = ", ".join(c.strip() for c in categories if c.strip())
        return [self._recommended(int(i), float(-k), "cold_start" if r else "popularity", (),
                                  SOURCE_REASONS["cold_start"] if r else
                                  (f"popular in {label}" if inside[i] else None))
                for k, (i, r) in enumerate(zip(rank, rare))]

    def _content_first(self, union: CandidateUnion, i: int, pos: np.ndarray, request: RerankRequest) -> np.ndarray:
        """For a nearly cold user (1..few_events positive events), a re-order of `pos` (positions into the union
        row, in scorer order) by 1/(k + rank) + dense_weight/(k + dense rank): the content path weighs more."""
        cold = self.cfg.cold_start
        if cold.dense_weight <= 0 or cold.few_events <= 0 or "dense" not in self.cfg.sources:
            return np.arange(len(pos))
        acts = request.actions
        positives = len(request.history) if acts is None else int(positive_mask(np.asarray(acts, dtype=object)).sum())
        if not 1 <= positives <= cold.few_events:
            return np.arange(len(pos))
        k = self.cfg.fusion_k
        dense_rank = union.ranks[i, pos, self.sources_names.index("dense")].astype(np.float64)
        blend = 1.0 / (k + 1.0 + np.arange(len(pos))) + np.where(dense_rank > 0, cold.dense_weight / (k + dense_rank),
                                                                 0.0)
        return np.argsort(-blend, kind="stable")

    def _rest_list(self, rest: np.ndarray, skip: np.ndarray, n: int) -> list[Recommended]:
        s = rest.copy()
        s[skip.astype(np.int64)] = -np.inf
        idx = np.flatnonzero(np.isfinite(s))
        idx = idx[np.lexsort((idx, -s[idx]))][:n]
        return [self._recommended(int(i), float(s[i]), self.cfg.rest, (), None) for i in idx]


def make_scorer(spec: str, train: pd.DataFrame, catalog: Catalog, valid=None) -> Scorer | None:
    """The scorer a spec names: 'none' (retrieval order), 'openai' (DRAGONREC_LLM_* settings), 'hf:MODEL_DIR'
    (a local causal LM) or 'model:NAME' (a dragonrec recommender, fitted here on `train`)."""
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
        from dragonrec.scorers.model import ModelScorer

        if arg in ("pipeline", "rag"):
            raise ValueError(f"a scorer cannot be another pipeline ({arg!r})")
        return ModelScorer(build(arg).fit(train, catalog, valid=valid))
    raise ValueError(f"unknown scorer {spec!r}: use none, openai, hf:MODEL_DIR or model:NAME")


_SCORER_POOL: ThreadPoolExecutor | None = None
_SCORER_POOL_LOCK = threading.Lock()


def _scorer_pool() -> ThreadPoolExecutor:
    """Worker threads for scorer calls with a time budget (shared by every pipeline of the process)."""
    global _SCORER_POOL
    with _SCORER_POOL_LOCK:
        if _SCORER_POOL is None:
            _SCORER_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dragonrec-scorer")
        return _SCORER_POOL


def _part_key(name: str, overrides: dict | None) -> tuple[str, str]:
    return name, json.dumps(overrides or {}, sort_keys=True)


def _has_signal(history: np.ndarray, actions, prefs: Preferences | None) -> bool:
    """A positive event or stated preferences: anything else (nothing, only scroll-pasts) is a cold user."""
    if prefs is not None and not prefs.is_empty():
        return True
    if not len(history):
        return False
    return actions is None or bool(positive_mask(np.asarray(actions, dtype=object)).any())


__all__ = ["DEFAULT_QUOTAS", "Pipeline", "PipelineConfig", "PipelineStats", "Recommendations", "Recommended",
           "RequestContext", "RerankConfig", "Reranker", "make_scorer"]
