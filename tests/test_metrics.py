"""Metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from dragonrec.evaluate.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    mrr,
    ndcg_at_k,
    novelty,
    target_ranks,
)


def test_target_ranks_full_catalog():
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    assert target_ranks(scores, np.array([1, 3])).tolist() == [0, 3]


def test_ties_count_against_the_target():
    scores = np.array([[1.0, 1.0, 1.0, 0.0]])
    assert target_ranks(scores, np.array([0])).tolist() == [2]


def test_excluding_history_moves_target_up_and_excluded_target_never_hits():
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert target_ranks(scores, np.array([2]), exclude=[np.array([0, 1])]).tolist() == [0]
    assert target_ranks(scores, np.array([0]), exclude=[np.array([0])]).tolist() == [4]


def test_perfect_and_missing_lists():
    assert hit_rate_at_k(np.array([0, 0]), 10) == 1.0
    assert ndcg_at_k(np.array([0, 0]), 10) == 1.0
    assert hit_rate_at_k(np.array([10, 50]), 10) == 0.0
    assert ndcg_at_k(np.array([10, 50]), 10) == 0.0
    assert mrr(np.array([0])) == 1.0


def test_hand_computed_values():
    ranks = np.array([0, 1, 4, 9, 10])
    assert hit_rate_at_k(ranks, 5) == pytest.approx(3 / 5)
    assert hit_rate_at_k(ranks, 10) == pytest.approx(4 / 5)
    expected = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5
    assert ndcg_at_k(ranks, 10) == pytest.approx(expected)
    assert ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 11) / 5)


def test_coverage():
    assert catalog_coverage([[0, 1], [1, 2]], 10) == pytest.approx(0.3)
    assert catalog_coverage([], 10) == 0.0


def test_intra_list_diversity_by_category():
    cats = np.array(["a", "a", "b", "c"], dtype=object)
    assert intra_list_diversity([[0, 1]], categories=cats) == 0.0
    assert intra_list_diversity([[0, 2, 3]], categories=cats) == 1.0
    assert intra_list_diversity([[0, 1, 2]], categories=cats) == pytest.approx(2 / 3)


def test_intra_list_diversity_by_embedding():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert intra_list_diversity([[0, 1]], embeddings=emb) == pytest.approx(0.0, abs=1e-6)
    assert intra_list_diversity([[0, 2]], embeddings=emb) == pytest.approx(1.0)


def test_novelty_prefers_rare_items():
    pop = np.array([50.0, 49.0, 1.0])
    assert novelty([[2]], pop) > novelty([[0]], pop)
    assert novelty([[0]], pop) == pytest.approx(-math.log2(50 / 100))
