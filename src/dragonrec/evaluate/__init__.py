"""Offline evaluation: metrics as pure functions and a runner that ranks the whole catalog."""

from dragonrec.evaluate.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    mrr,
    ndcg_at_k,
    novelty,
    target_ranks,
)
from dragonrec.evaluate.runner import evaluate_cases, evaluate_split

__all__ = [
    "catalog_coverage", "evaluate_cases", "evaluate_split", "hit_rate_at_k", "intra_list_diversity", "mrr",
    "ndcg_at_k", "novelty", "target_ranks",
]
