"""The user query (action and recency weights, preferences), dense retrieval, and the cold-start list."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dragonrec.candidates import (
    ColdStart,
    ColdStartConfig,
    DenseRetriever,
    Preferences,
    QueryConfig,
    preference_vector,
    query_vector,
    query_vectors,
)
from dragonrec.embed import HashEmbedder
from dragonrec.index import VectorIndex

# Three orthogonal "topics": items 0-1 lips, 2-3 hair, 4-5 nails (unit basis vectors + a little noise).
E = np.zeros((6, 9), dtype=np.float32)
for i in range(6):
    E[i, i // 2] = 1.0
    E[i, 3 + i] = 0.1
E /= np.linalg.norm(E, axis=1, keepdims=True)


def topic(q: np.ndarray) -> int:
    return int(np.argmax(q[:3]))


def test_purchase_outweighs_view_and_negative_actions_push_away():
    cfg = QueryConfig(half_life=None)
    q = query_vector(np.array([0, 2]), np.array(["view", "purchase"]), E, cfg)
    assert topic(q) == 1  # hair (purchased) beats lips (viewed)
    q = query_vector(np.array([0, 2]), np.array(["purchase", "view"]), E, cfg)
    assert topic(q) == 0
    q = query_vector(np.array([0, 2]), np.array(["view", "remove_from_cart"]), E, cfg)
    assert q @ E[2] < 0 < q @ E[0]
    q = query_vector(np.array([0, 4]), np.array(["click", "scroll_past"]), E, cfg)
    assert q @ E[4] < 0


def test_recency_decides_between_equal_actions():
    h, a = np.array([0, 2]), np.array(["purchase", "purchase"])
    assert topic(query_vector(h, a, E, QueryConfig(half_life=1.0))) == 1  # the latest wins
    # a stronger old action survives a slow decay but not a fast one
    h, a = np.array([0, 2]), np.array(["purchase", "view"])
    assert topic(query_vector(h, a, E, QueryConfig(half_life=10.0))) == 0
    assert topic(query_vector(h, a, E, QueryConfig(half_life=0.3))) == 1
    # the window keeps only the latest events
    assert topic(query_vector(np.array([0, 0, 0, 4]), None, E, QueryConfig(half_life=None, max_history=1))) == 2


def test_weights_are_typed_config_and_unknown_actions_are_refused():
    cfg = QueryConfig(action_weights={**QueryConfig().action_weights, "view": -1.0}, half_life=None)
    assert query_vector(np.array([0]), np.array(["view"]), E, cfg) is None  # only negative signal: no query
    assert cfg.weight_of("bought") == cfg.action_weights["purchase"]  # spellings from logs are understood
    with pytest.raises(ValueError, match="unknown action"):
        query_vector(np.array([0]), np.array(["teleport"]), E, QueryConfig())
    with pytest.raises(ValueError, match="actions"):
        query_vector(np.array([0, 1]), np.array(["view"]), E, QueryConfig())


def test_preferences_steer_and_serve_users_without_history():
    emb = HashEmbedder()
    prefs = Preferences(text="vegan skincare", categories=["Beauty > Hair"])
    assert prefs.texts() == ["vegan skincare", "Category: Beauty > Hair"]
    pv = preference_vector(prefs, emb)
    assert pv.shape == (384,) and np.isclose(np.linalg.norm(pv), 1)
    assert preference_vector(Preferences(), emb) is None and preference_vector(None, emb) is None
    # no history: the query is the preference vector itself
    items = emb.encode(["Category: Beauty > Hair. shampoo", "Category: Beauty > Nails. polish"])
    q = query_vector(np.zeros(0, np.int64), None, items, QueryConfig(), pv)
    assert q @ items[0] > q @ items[1]
    assert query_vector(np.zeros(0, np.int64), None, items, QueryConfig()) is None


def test_batch_queries_flag_users_without_signal():
    q, ok = query_vectors([np.array([0]), np.zeros(0, np.int64), np.array([2])],
                          [np.array(["purchase"]), np.zeros(0, object), np.array(["scroll_past"])], E, QueryConfig())
    assert ok.tolist() == [True, False, False] and not q[1].any()


def test_dense_retrieval_excludes_history_and_maps_to_catalog_indices():
    ids = [f"i{k}" for k in range(6)]
    index = VectorIndex.build(E, ids)
    retr = DenseRetriever(index, ids)
    cand = retr.retrieve(E[[0]], k=3, exclude=[np.array([0])])
    assert cand.items[0, 0] == 1 and 0 not in cand.items[0]
    assert np.all(np.diff(cand.scores[0]) <= 0)
    # a catalog whose order differs from the index labels still gets its own indices back
    retr2 = DenseRetriever(index, ids[::-1])
    assert retr2.retrieve(E[[0]], k=1).items[0, 0] == 5
    # asking for more than exists pads with -1
    full = retr.retrieve(E[[0]], k=10, exclude=[np.array([0, 1])])
    items, _ = full.row(0)
    assert len(items) == 4 and set(items) == {2, 3, 4, 5} and (full.items[0, 4:] == -1).all()


def test_cold_start_blends_popularity_with_new_items():
    # items 0..9: 0 is the most popular, 9 appears only at the very end, 10-11 never appear
    rows = []
    for item, users in enumerate([30, 20, 15, 10, 8, 6, 5, 4, 3, 1]):
        for u in range(users):
            rows.append({"user_id": f"u{u}", "item_idx": item, "timestamp": 100.0 + item + (900 if item == 9 else 0)})
    train = pd.DataFrame(rows)
    cold = ColdStart(ColdStartConfig(explore_share=0.25, rare_max_users=1)).fit(train, 12)
    assert set(cold.explore_pool.tolist()) == {9, 10, 11}
    rank = cold.ranking()
    assert sorted(rank.tolist()) == list(range(12))  # every item once
    assert rank[:3].tolist() == [0, 1, 2] and rank[3] in (9, 10, 11)  # every 4th slot explores
    assert ColdStart(ColdStartConfig(explore_share=0)).fit(train, 12).ranking(5).tolist() == [0, 1, 2, 3, 4]
    assert cold.ranking(seed=1)[3] in (9, 10, 11)
    s = cold.scores()
    assert np.argsort(-s, kind="stable").tolist() == rank.tolist() and s.max() < -1  # below any cosine
