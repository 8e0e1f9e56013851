"""A scorer backed by any fitted dragonrec Recommender: its `score()` output ranks the candidates."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dragonrec.scorers.base import Scorer, ScoreRequest, ScoreResult, Usage, item_actions, item_indices


class ScoresCatalog(Protocol):
    """What a model scorer needs of a model: any fitted dragonrec Recommender has it."""

    name: str

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray: ...


class ModelScorer(Scorer):
    """Scores candidates by a fitted Recommender (e.g. co-occurrence now, the generative model's likelihoods
    later). Histories go in as catalog indices with their actions; one `score()` call per batch."""

    def __init__(self, model: ScoresCatalog):
        self.model = model
        self.name = f"model:{model.name}"

    def score(self, request: ScoreRequest) -> ScoreResult:
        return self.score_batch([request])[0]

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        t0 = time.perf_counter()
        histories = [item_indices(r.history) for r in requests]
        actions = [np.asarray([a or "purchase" for a in item_actions(r.history)], dtype=object) for r in requests]
        try:
            full = np.asarray(self.model.score(histories, actions), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - a broken model must not take the request down: fall back to retrieval
            return [ScoreResult.fallback(len(r.candidates), f"{self.name} failed: {type(e).__name__}: {e}")
                    for r in requests]
        per = (time.perf_counter() - t0) / len(requests)
        out = []
        for b, r in enumerate(requests):
            cand = item_indices(r.candidates)
            s = full[b, cand].astype(np.float32)
            s = np.where(np.isfinite(s), s, np.nan).astype(np.float32)  # -inf = the model cannot score it
            out.append(ScoreResult(s, [f"ranked by {self.model.name}"] * len(cand),
                                   usage=Usage(requests=1, latency_s=per)))
        return out
