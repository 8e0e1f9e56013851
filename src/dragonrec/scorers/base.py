"""The scorer interface: given a user's history and K retrieved candidates, score each candidate's relevance.

Backends: an OpenAI-compatible chat endpoint (`openai_compat`), a local Hugging Face causal LM (`hf_local`)
and any fitted dragonrec Recommender (`model`). A scorer never raises for a model failure: it answers
`degraded=True` with the reason, and the pipeline falls back to the retrieval order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from dragonrec.candidates.query import Preferences


@dataclass(frozen=True)
class ItemView:
    """An item as a scorer sees it: its catalog index (for model scorers) and its text (for language models)."""

    idx: int
    text: str
    action: str | None = None  # for history entries: what the user did


class ItemViews(Sequence[ItemView]):
    """Items as a scorer sees them, built only when read: a model scorer reads `indices` (and `actions`) and never
    the texts, so a request's hundreds of candidates cost it no `ItemView` objects; a language-model scorer
    iterates the views as from a list."""

    __slots__ = ("_texts", "_views", "actions", "indices")

    def __init__(self, indices: np.ndarray, texts: Sequence[str], actions: Sequence[str | None] | None = None):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.actions = None if actions is None else [None if a is None else str(a) for a in actions]
        if self.actions is not None and len(self.actions) != len(self.indices):
            raise ValueError(f"{len(self.actions)} actions for {len(self.indices)} items")
        self._texts = texts
        self._views: list[ItemView] | None = None

    def _all(self) -> list[ItemView]:
        if self._views is None:
            acts = self.actions or [None] * len(self.indices)
            self._views = [ItemView(int(i), self._texts[i], a) for i, a in zip(self.indices, acts)]
        return self._views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        return self._all()[k]

    def __iter__(self):
        return iter(self._all())

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return f"ItemViews({len(self)} items)"


def item_indices(views: Sequence[ItemView]) -> np.ndarray:
    """[n] catalog indices of `views` (read without building views when they are `ItemViews`)."""
    if isinstance(views, ItemViews):
        return views.indices
    return np.asarray([v.idx for v in views], dtype=np.int64)


def item_actions(views: Sequence[ItemView]) -> list[str | None]:
    """Each view's action (None where there is none)."""
    if isinstance(views, ItemViews):
        return views.actions or [None] * len(views)
    return [v.action for v in views]


@dataclass
class ScoreRequest:
    """One user's scoring job: history oldest first, candidates in retrieval order."""

    history: Sequence[ItemView]  # a list, or `ItemViews` (built only when read)
    candidates: Sequence[ItemView]
    preferences: Preferences | None = None
    retrieval_scores: np.ndarray | None = None  # [K] similarities, aligned with candidates


@dataclass
class Usage:
    """Accounting of one scoring call (or a sum of many)."""

    requests: int = 0  # HTTP requests / model calls made (retries included)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0  # wall time spent in the backend

    def __iadd__(self, other: Usage) -> Self:
        for f in ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self


@dataclass
class ScoreResult:
    """Scores aligned with the request's candidates (NaN = not scored), a one-line reason per candidate."""

    scores: np.ndarray
    reasons: list[str | None]
    degraded: bool = False
    degraded_reason: str | None = None
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def fallback(cls, n: int, reason: str, usage: Usage | None = None) -> ScoreResult:
        """No scores at all: the caller keeps the retrieval order."""
        return cls(np.full(n, np.nan, dtype=np.float32), [None] * n, True, reason, usage or Usage())

    def order(self, retrieval_scores: np.ndarray | None = None) -> np.ndarray:
        """Candidate positions best first: by score, unscored after scored, ties by retrieval order."""
        n = len(self.scores)
        s = np.where(np.isnan(self.scores), -np.inf, self.scores)
        r = np.zeros(n) if retrieval_scores is None else -np.asarray(retrieval_scores, dtype=np.float64)
        # lexsort: last key is primary; then retrieval similarity, then original position
        return np.lexsort((np.arange(n), r, -s))


@dataclass
class ScorerStats:
    """How many requests a scorer answered and how many fell back to retrieval order, by reason."""

    requests: int = 0
    degraded: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # reason (first 120 characters) -> requests

    def add(self, result: ScoreResult) -> None:
        self.requests += 1
        if result.degraded:
            self.degraded += 1
            reason = (result.degraded_reason or "unknown")[:120]
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"requests": self.requests, "scored": self.requests, "degraded": self.degraded,
                "degraded_share": self.degraded / self.requests if self.requests else 0.0,
                "degraded_reasons": dict(sorted(self.reasons.items(), key=lambda kv: -kv[1])[:10])}


class Scorer(ABC):
    """Scores candidates for users. Subclasses implement `score`; `score_batch` may run requests concurrently."""

    name: str = "scorer"

    @abstractmethod
    def score(self, request: ScoreRequest) -> ScoreResult:
        """Scores for request.candidates (same order)."""

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return [self.score(r) for r in requests]

    def close(self) -> None:
        """Release connections or models."""
