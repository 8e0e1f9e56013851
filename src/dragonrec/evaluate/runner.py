"""Full-ranking evaluation of any Recommender on EvalCases, overall and on named slices."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from dragonrec.data.splits import EvalCases, Split
from dragonrec.evaluate.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    mrr,
    ndcg_at_k,
    novelty,
    target_ranks,
)
from dragonrec.recommenders.base import Recommender
from dragonrec.schema import positive_mask

KS = (5, 10, 20)


def ranking_metrics(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    out["mrr"] = mrr(ranks)
    out["cases"] = len(ranks)
    return out


def evaluate_cases(model: Recommender, cases: EvalCases, *, train: pd.DataFrame | None = None,
                   slices: dict[str, np.ndarray] | None = None, ks=KS, n: int = 10, batch_size: int = 512,
                   embeddings: np.ndarray | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Rank the whole catalog for every case; metrics with history items excluded (the default) and kept.

    Returns {"metrics": {...}, "keep_history": {...}, "slices": {name: {...}}, "beyond": {...}, "seconds": ...,
    "ranks": [len(cases)] 0-based rank of each target, history excluded (paired comparisons of two models)},
    plus "degradation" ({requests, degraded, reasons}) for a model with a fallible scorer (`stats()`).
    Beyond-accuracy metrics are computed on the top-n lists with history excluded.
    """
    t0 = time.perf_counter()
    n_items = len(model.catalog)
    if cases.target_actions is not None and len(cases) and not positive_mask(cases.target_actions).all():
        raise ValueError("evaluation targets must be positive events (see dragonrec.schema.ACTION_MEANING)")
    if hasattr(model, "reset_stats"):
        model.reset_stats()
    ranks_ex, ranks_keep, lists = [], [], []
    for start in range(0, len(cases), batch_size):
        hist = cases.histories[start:start + batch_size]
        acts = cases.actions[start:start + batch_size]
        tgt = cases.targets[start:start + batch_size]
        scores = np.asarray(model.score(hist, acts), dtype=np.float32)
        if scores.shape != (len(hist), n_items):
            raise ValueError(f"{type(model).__name__}.score returned {scores.shape}, expected {(len(hist), n_items)}")
        ranks_keep.append(target_ranks(scores, tgt))
        ranks_ex.append(target_ranks(scores, tgt, exclude=hist))
        masked = scores.copy()
        for b, h in enumerate(hist):
            masked[b, h] = -np.inf
        top = np.argpartition(-masked, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(masked, top, axis=1), axis=1, kind="stable")
        lists.extend(np.take_along_axis(top, order, axis=1).tolist())
        if progress:
            progress(min(start + batch_size, len(cases)), len(cases))
    ranks_ex = np.concatenate(ranks_ex) if ranks_ex else np.zeros(0, np.int64)
    ranks_keep = np.concatenate(ranks_keep) if ranks_keep else np.zeros(0, np.int64)
    result = {"metrics": ranking_metrics(ranks_ex, ks), "keep_history": ranking_metrics(ranks_keep, ks),
              "slices": {name: ranking_metrics(ranks_ex[np.asarray(mask, dtype=bool)], ks)
                         for name, mask in (slices or {}).items()}}
    if hasattr(model, "stats"):
        result["degradation"] = model.stats()
    beyond = {f"coverage@{n}": catalog_coverage(lists, n_items),
              f"ild_category@{n}": intra_list_diversity(lists, categories=model.catalog.categories)}
    if embeddings is not None:
        beyond[f"ild_embedding@{n}"] = intra_list_diversity(lists, embeddings=embeddings)
    if train is not None:
        pop = np.bincount(train.drop_duplicates(["user_id", "item_idx"])["item_idx"].to_numpy(), minlength=n_items)
        beyond[f"novelty@{n}"] = novelty(lists, pop)
        # Share of recommended slots taken by the 1% most popular items (preference training can narrow to them).
        head = np.argsort(-pop, kind="stable")[:max(1, n_items // 100)]
        beyond[f"top1pct_share@{n}"] = float(np.isin(np.asarray(lists), head).mean()) if lists else 0.0
    result["beyond"] = beyond
    result["ranks"] = ranks_ex
    result["seconds"] = time.perf_counter() - t0
    return result


def evaluate_split(model: Recommender, split: Split, **kw) -> dict:
    """Validation and test results for a fitted model, in the shape `dragonrec evaluate` writes."""
    return {
        "valid": evaluate_cases(model, split.valid, train=split.train, slices=split.valid_slices, **kw),
        "test": evaluate_cases(model, split.test, train=split.train, slices=split.slices, **kw),
    }
