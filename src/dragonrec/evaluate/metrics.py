"""Ranking and beyond-accuracy metrics as pure functions over numpy arrays.

Ranks are 0-based positions of the target in a full ranking of the catalog. Ties are broken against the
target (every item scored equal to it counts as ahead), so a model cannot gain from ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """0-based rank of each target among all items. scores: [B, N]; targets: [B].

    `exclude[b]` are items removed from user b's ranking (e.g. the history). An excluded target can never
    be hit: its rank is N (past any cut-off).
    """
    s = np.array(scores, dtype=np.float32, copy=True)
    b = np.arange(len(targets))
    if exclude is not None:
        rows = np.concatenate([np.full(len(e), i, dtype=np.int64) for i, e in enumerate(exclude)] or [np.zeros(0, np.int64)])
        cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude] or [np.zeros(0, np.int64)])
        s[rows, cols] = -np.inf
    t = s[b, targets]
    s = np.nan_to_num(s, nan=-np.inf)
    ahead = (s >= t[:, None]).sum(axis=1) - 1  # ties count as ahead; minus the target itself
    ranks = ahead.astype(np.int64)
    ranks[~np.isfinite(t)] = s.shape[1]  # excluded (or unscorable) target: never a hit
    return ranks


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of cases whose target is in the top k."""
    ranks = np.asarray(ranks)
    return float((ranks < k).mean()) if len(ranks) else 0.0


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of each case with one relevant item (0-based ranks): 1/log2(rank+2) inside the top k, else 0."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item per case (`ndcg_gains`)."""
    ranks = np.asarray(ranks)
    if not len(ranks):
        return 0.0
    return float(ndcg_gains(ranks, k).mean())


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank over the full ranking (not truncated)."""
    ranks = np.asarray(ranks)
    return float((1.0 / (ranks + 1.0)).mean()) if len(ranks) else 0.0


def catalog_coverage(rec_lists: Sequence[Sequence[int]], n_items: int) -> float:
    """Share of the catalog that appears in at least one recommendation list."""
    if n_items <= 0:
        return 0.0
    seen = {int(i) for lst in rec_lists for i in lst}
    return len(seen) / n_items


def intra_list_diversity(rec_lists: Sequence[Sequence[int]], *, categories: np.ndarray | None = None,
                         embeddings: np.ndarray | None = None) -> float:
    """Mean pairwise dissimilarity inside each list, averaged over lists.

    By category: share of pairs in different categories (unknown categories count as different from all).
    By embedding: mean of 1 - cosine similarity of the items' (text) embeddings.
    """
    if (categories is None) == (embeddings is None):
        raise ValueError("give exactly one of categories or embeddings")
    values = []
    for lst in rec_lists:
        idx = np.asarray(lst, dtype=np.int64)
        m = len(idx)
        if m < 2:
            continue
        iu = np.triu_indices(m, k=1)
        if categories is not None:
            c = np.asarray(categories, dtype=object)[idx]
            same = (c[:, None] == c[None, :]) & (c[:, None] != "")
            values.append(float(1.0 - same[iu].mean()))
        else:
            e = np.asarray(embeddings, dtype=np.float32)[idx]
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            values.append(float((1.0 - e @ e.T)[iu].mean()))
    return float(np.mean(values)) if values else 0.0


def novelty(rec_lists: Sequence[Sequence[int]], item_popularity: np.ndarray) -> float:
    """Mean self-information -log2 p(i) of recommended items, p(i) = share of training users who had item i.

    Items never seen in training get the novelty of an item seen once.
    """
    pop = np.asarray(item_popularity, dtype=np.float64)
    total = pop.sum()
    if total <= 0:
        return 0.0
    p = np.maximum(pop, 1.0) / max(total, 1.0)
    vals = [-np.log2(p[int(i)]) for lst in rec_lists for i in lst]
    return float(np.mean(vals)) if vals else 0.0
