"""The user query vector: recent history weighted by action and recency, plus stated preferences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.embed import Embedder, embed_texts, normalize
from dragonrec.schema import ACTION_ALIASES, ACTION_MEANING, Action


def _default_action_weights() -> dict[str, float]:
    # From the one event-semantics table: a purchase pulls the query 4x, a scroll-past pushes it away.
    return {a.value: 4.0 * m.strength for a, m in ACTION_MEANING.items()}


class QueryConfig(BaseModel):
    """How a user's history and preferences become one query vector."""

    model_config = ConfigDict(frozen=True)

    action_weights: dict[str, float] = Field(default_factory=_default_action_weights)
    """Weight of each action; negative weights pull the query away from the item."""
    default_action: str = Action.PURCHASE.value
    """Action assumed when a history comes without actions."""
    half_life: float | None = 3.0
    """Recency: an event's weight halves every `half_life` events back from the latest; None = no decay."""
    max_history: int = 50
    """Only the latest events count."""
    preference_weight: float = 1.0
    """Weight of stated preferences, relative to the whole (normalised) history."""

    def weight_of(self, action: str) -> float:
        key = ACTION_ALIASES.get(str(action).strip().lower(), None)
        if key is None:
            raise ValueError(f"unknown action {action!r} in a history (known: {', '.join(self.action_weights)})")
        return float(self.action_weights.get(key.value, 0.0))


class Preferences(BaseModel):
    """What a user told us: free text ("vegan skincare, no fragrance") and/or categories ("Beauty > Hair")."""

    text: str | None = None
    categories: list[str] = Field(default_factory=list)

    def texts(self) -> list[str]:
        out = [self.text.strip()] if self.text and self.text.strip() else []
        # the same "Category: ..." phrasing as the item text template, so the vectors meet
        out += [f"Category: {c.strip()}" for c in self.categories if c and c.strip()]
        return out

    def is_empty(self) -> bool:
        return not self.texts()


def history_weights(history: np.ndarray, actions: np.ndarray | None, cfg: QueryConfig) -> tuple[np.ndarray, np.ndarray]:
    """(items, weights) of the latest `max_history` events: action weight x 0.5 ** (age / half_life)."""
    history = np.asarray(history, dtype=np.int64)[-cfg.max_history:] if cfg.max_history > 0 else np.zeros(0, np.int64)
    n = len(history)
    if actions is None:
        act_w = np.full(n, cfg.weight_of(cfg.default_action))
    else:
        acts = list(np.asarray(actions, dtype=object))[-n:] if n else []
        if len(acts) != n:
            raise ValueError(f"history has {n} events but {len(acts)} actions")
        act_w = np.asarray([cfg.weight_of(a) for a in acts], dtype=np.float64)
    age = np.arange(n - 1, -1, -1, dtype=np.float64)  # 0 = latest
    rec_w = 0.5 ** (age / cfg.half_life) if cfg.half_life else np.ones(n)
    return history, act_w * rec_w


def query_vector(history: np.ndarray, actions: np.ndarray | None, item_vectors: np.ndarray, cfg: QueryConfig,
                 preference_vector: np.ndarray | None = None) -> np.ndarray | None:
    """Unit query vector [dim], or None when there is no positive signal (the cold-start case).

    history part = sum_i w_i e_i / sum_i |w_i| (positive actions pull, negative ones push);
    query = normalise(history part + preference_weight * preference vector).
    """
    items, w = history_weights(history, actions, cfg)
    has_positive = bool((w > 0).any())
    has_prefs = preference_vector is not None
    if not has_positive and not has_prefs:
        return None
    q = np.zeros(item_vectors.shape[1], dtype=np.float64)
    if len(items) and np.abs(w).sum() > 0:
        q += (w[:, None] * item_vectors[items]).sum(axis=0) / np.abs(w).sum()
    if has_prefs:
        q += cfg.preference_weight * np.asarray(preference_vector, dtype=np.float64)
    if not np.linalg.norm(q) > 1e-9:
        return None
    return normalize(q.astype(np.float32)[None])[0]


def preference_vector(prefs: Preferences | None, embedder: Embedder, cache_dir=None) -> np.ndarray | None:
    """Mean embedding of the preference texts (unit length), or None when there are none."""
    if prefs is None or prefs.is_empty():
        return None
    vecs = embed_texts(prefs.texts(), embedder=embedder, cache_dir=cache_dir)
    return normalize(vecs.mean(axis=0, keepdims=True))[0]


def query_vectors(histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None, item_vectors: np.ndarray,
                  cfg: QueryConfig) -> tuple[np.ndarray, np.ndarray]:
    """Batch form without preferences: ([B, dim] queries, [B] bool has_query); rows without one are zero."""
    out = np.zeros((len(histories), item_vectors.shape[1]), dtype=np.float32)
    ok = np.zeros(len(histories), dtype=bool)
    for b, h in enumerate(histories):
        q = query_vector(h, None if actions is None else actions[b], item_vectors, cfg)
        if q is not None:
            out[b], ok[b] = q, True
    return out, ok
