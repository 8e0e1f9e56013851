"""Cold start: popularity (overall, or in the categories a user stated or browses), with some slots given to new or
rarely seen items; and how much the content (dense) path weighs for users with only one or two events."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from dragonrec.data.stats import item_popularity


class ColdStartConfig(BaseModel):
    """How the no-signal user's list blends the popular with the new."""

    model_config = ConfigDict(frozen=True)

    explore_share: float = 0.2
    """Share of list slots given to exploration items (0 = pure popularity)."""
    new_quantile: float = 0.1
    """An item first seen in the latest `new_quantile` of the training time span counts as new."""
    rare_max_users: int = 2
    """An item seen by at most this many training users counts as rarely seen (never-seen items always do)."""
    seed: int = 0
    """Seed of the exploration order (a request may pass its own)."""
    segment: bool = True
    """A user with no positive event who stated categories (no free text): the most popular items of those
    categories (popularity by segment), with the same exploration slots; False: the dense preference query on
    the categories' names. Chosen on validation (benchmarks/bench_cold_validation.py, 5,000 Beauty validation
    users: NDCG@10 0.0063 against 0.0004 for the dense query, +0.0059 +- 0.0008 case by case; a visitor who
    states nothing gets 0.0054)."""
    few_events: int = 2
    """Users with at least one and at most this many positive events count as nearly cold (0 = none do)."""
    dense_weight: float = 0.1
    """For nearly cold users, the list is re-ordered by 1/(60 + scorer rank) + dense_weight / (60 + dense rank):
    the content path weighs more where the history says little; 0 = the scorer's order. 0.1 was chosen on
    validation (benchmarks/bench_cold.py's sweep) and checked on 5,000 other validation users
    (bench_cold_validation.py: +0.0012 +- 0.0009 NDCG@10 at one event, +0.0022 +- 0.0010 at two)."""


class ColdStart:
    """Popularity order with exploration items interleaved every 1/explore_share slots."""

    def __init__(self, cfg: ColdStartConfig | None = None):
        self.cfg = cfg or ColdStartConfig()

    def fit(self, train: pd.DataFrame, n_items: int) -> ColdStart:
        self.popularity = item_popularity(train, n_items)
        first = np.full(n_items, np.inf)
        if len(train):
            seen = train.groupby("item_idx")["timestamp"].min()
            first[seen.index.to_numpy(dtype=np.int64)] = seen.to_numpy(dtype=np.float64)
            t_lo, t_hi = float(train["timestamp"].min()), float(train["timestamp"].max())
            new_after = t_hi - self.cfg.new_quantile * (t_hi - t_lo)
        else:
            new_after = -np.inf
        never = ~np.isfinite(first)
        self.explore_pool = np.flatnonzero(never | (first >= new_after) | (self.popularity <= self.cfg.rare_max_users))
        return self

    def ranking(self, n: int | None = None, seed: int | None = None) -> np.ndarray:
        """Catalog indices, best first (the whole catalog unless `n`)."""
        n_items = len(self.popularity)
        n = n_items if n is None else min(n, n_items)
        popular = np.argsort(-self.popularity, kind="stable")
        rng = np.random.default_rng(self.cfg.seed if seed is None else seed)
        explore = rng.permutation(self.explore_pool)
        if self.cfg.explore_share <= 0 or not len(explore):
            return popular[:n]
        every = max(1, round(1 / self.cfg.explore_share))
        out, used = [], np.zeros(n_items, dtype=bool)
        p = e = 0
        while len(out) < n:
            # slot every-th (1-based) goes to exploration: e.g. slots 5, 10, ... for a 0.2 share
            take_explore = (len(out) + 1) % every == 0 and e < len(explore)
            if take_explore:
                i = explore[e]; e += 1
            elif p < n_items:
                i = popular[p]; p += 1
            elif e < len(explore):
                i = explore[e]; e += 1
            else:
                break
            if not used[i]:
                used[i] = True
                out.append(int(i))
        return np.asarray(out, dtype=np.int64)

    def segment_ranking(self, in_segment: np.ndarray, n: int | None = None, seed: int | None = None) -> np.ndarray:
        """`ranking()` restricted to the items where `in_segment` [n_items] bool is true (popularity by segment,
        exploration slots from the segment's explore pool), then every other item in `ranking()` order."""
        rank = self.ranking(seed=seed)
        seg = ColdStart(self.cfg)
        seg.popularity = np.where(in_segment, self.popularity, -1)  # outside items rank after every inside one
        seg.explore_pool = self.explore_pool[in_segment[self.explore_pool]]
        head = seg.ranking(seed=seed)
        head = head[in_segment[head]]
        out = np.concatenate([head, rank[~in_segment[rank]]])
        return out if n is None else out[:n]

    def scores(self, seed: int | None = None) -> np.ndarray:
        """[n_items] float32 scores whose descending order is `ranking()`; all in (-3, -2], below any cosine."""
        rank = self.ranking(seed=seed)
        out = np.full(len(self.popularity), -3.0, dtype=np.float32)
        out[rank] = -2.0 - np.arange(len(rank), dtype=np.float32) / max(len(rank), 1)
        return out
