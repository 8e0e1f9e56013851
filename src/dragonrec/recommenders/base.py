"""The recommender contract: fit on training events, score every catalog item for a batch of histories,
recommend N with exclusions. Every model (baselines, RAG, the generative LM) honours it, and one contract
test suite (tests/test_recommender_contract.py) checks each of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import pandas as pd

from dragonrec.data.catalog import Catalog


class Recommender(ABC):
    """Scores are float32 [batch, len(catalog)], higher is better, in catalog order.

    `histories[b]` is user b's catalog indices, oldest first; `actions[b]` (optional) the action names aligned
    with it. Items a model cannot score (e.g. never seen in training by an ID-only model) get -inf or any
    finite floor; the evaluation breaks ties against the target, so ties never help a model.
    """

    name: ClassVar[str]
    catalog: Catalog

    @abstractmethod
    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        """Learn from training events (canonical columns + item_idx). `valid` (EvalCases) may drive early
        stopping or tuning; it is never the test split."""

    @abstractmethod
    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[len(histories), len(catalog)] float32 scores."""

    def recommend(self, history: np.ndarray, n: int = 10, exclude: Iterable[int] | None = None,
                  exclude_history: bool = True, actions: np.ndarray | None = None) -> list[int]:
        """The top-n catalog indices for one history, never an excluded item (nor a history item, by default)."""
        scores = self.score([np.asarray(history, dtype=np.int64)], None if actions is None else [actions])[0]
        return top_n(scores, n, exclude=_exclusions(history if exclude_history else (), exclude))

    def save(self, path: Path) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no saved form; it is refitted instead")

    @classmethod
    def load(cls, path: Path, catalog: Catalog) -> Self:
        raise NotImplementedError(f"{cls.__name__} has no saved form; it is refitted instead")

    def config(self) -> dict:
        """The settings that define this model, for reports."""
        cfg = getattr(self, "cfg", None)
        return cfg.model_dump() if hasattr(cfg, "model_dump") else {}


def check_train_events(train: pd.DataFrame, columns=("user_id", "item_idx", "action")) -> None:
    """A clear error for training events a model cannot learn from."""
    missing = set(columns) - set(train.columns)
    if missing:
        raise ValueError(f"training events lack columns {sorted(missing)}")
    if not len(train):
        raise ValueError("no training events")


def _exclusions(history: Iterable[int], exclude: Iterable[int] | None) -> np.ndarray:
    parts = [np.asarray(list(history), dtype=np.int64)]
    if exclude is not None:
        parts.append(np.asarray(list(exclude), dtype=np.int64))
    return np.concatenate(parts)


def top_n(scores: np.ndarray, n: int, exclude: np.ndarray | None = None) -> list[int]:
    """Indices of the n best scores, best first, skipping `exclude` and items scored -inf."""
    s = np.asarray(scores, dtype=np.float32).copy()
    if exclude is not None and len(exclude):
        s[np.asarray(exclude, dtype=np.int64)] = -np.inf
    n = min(n, int(np.isfinite(s).sum()))
    if n <= 0:
        return []
    part = np.argpartition(-s, n - 1)[:n]
    return part[np.argsort(-s[part], kind="stable")].tolist()
