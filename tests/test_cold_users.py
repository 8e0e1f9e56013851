"""Cold users: no history -> stated categories (popularity by segment) -> exploration; one or two events ->
the content (dense) path weighs more."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dragonrec.candidates.cold import ColdStart, ColdStartConfig
from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import leave_one_out
from dragonrec.embed import HashEmbedder
from dragonrec.pipeline import Pipeline, PipelineConfig


def test_segment_ranking_puts_the_segments_popular_items_first_with_its_own_exploration():
    # items 0..5 seen by 6..1 users; 6..9 never seen (explore pool); the segment: odd items
    train = pd.DataFrame({"user_id": [f"u{u}" for i in range(6) for u in range(6 - i)],
                          "item_idx": [i for i in range(6) for _ in range(6 - i)], "timestamp": 0.0,
                          "action": "purchase"})
    cold = ColdStart(ColdStartConfig(explore_share=0.25, rare_max_users=0)).fit(train, 10)
    seg = np.arange(10) % 2 == 1
    rank = cold.segment_ranking(seg, seed=3).tolist()
    assert rank[:3] == [1, 3, 5] and rank[3] in (7, 9)  # every 4th slot explores, inside the segment
    assert set(rank[:5]) <= {1, 3, 5, 7, 9} and sorted(rank) == list(range(10))
    assert rank[5:7] == [0, 2]  # then the rest in the overall order
    assert cold.segment_ranking(np.ones(10, bool), seed=3).tolist() == cold.ranking(seed=3).tolist()


def config(**cold) -> PipelineConfig:
    return PipelineConfig.union({"dense": 4, "cooccurrence": 3, "popularity": 2}, model="cooccurrence",
                                scorer="model:cooccurrence", rest="cooccurrence", dense=DenseConfig(cache_dir=None),
                                cold_start=ColdStartConfig(**cold))


def test_a_cold_user_who_states_categories_gets_that_segments_popular_items(chain_dataset):
    ds = chain_dataset
    split = leave_one_out(ds.events)
    pipe = Pipeline(config(explore_share=0.0, segment=True), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    recs = pipe.recommend_for([], None, 4, {"preferences": {"categories": ["hair"]}})
    hair = [i for i in range(len(ds.catalog)) if "hair" in ds.catalog.categories[i].lower()]
    assert recs.cold and recs.source == "preferences" and set(recs.indices) == set(hair)
    pop = pipe.cold.popularity
    assert [pop[i] for i in recs.indices] == sorted((pop[i] for i in recs.indices), reverse=True)
    assert all(r.reason == "popular in hair" for r in recs)
    # free text goes to the dense preference query; segment=False too
    assert not pipe.recommend_for([], None, 4, {"preferences": {"text": "shiny", "categories": ["hair"]}}).cold
    off = Pipeline(config(explore_share=0.0, segment=False), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    assert not off.recommend_for([], None, 4, {"preferences": {"categories": ["hair"]}}).cold
    # no history, no preferences: the cold list (popularity with exploration)
    assert pipe.recommend_for([], None, 4).source == "cold_start"


def test_one_or_two_events_weigh_the_content_path_more(chain_dataset):
    ds = chain_dataset
    split = leave_one_out(ds.events)
    base = Pipeline(config(dense_weight=0.0), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    content = Pipeline(config(dense_weight=5.0), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    hist = split.test.histories[0]
    few, many = hist[-1:], hist
    acts_few, acts_many = ["purchase"], ["purchase"] * len(hist)
    a, b = base.recommend_for(few, acts_few, 6), content.recommend_for(few, acts_few, 6)
    dense_share = [sum("dense" in r.sources for r in recs[:3]) for recs in (a, b)]
    assert dense_share[1] >= dense_share[0] and a.items != b.items
    assert b[0].sources and "dense" in b[0].sources  # the top is a content match
    # a user with a real history is untouched, online and offline
    assert base.recommend_for(many, acts_many, 6).items == content.recommend_for(many, acts_many, 6).items
    np.testing.assert_array_equal(base.score([many], [acts_many]), content.score([many], [acts_many]))
    assert not np.array_equal(base.score([few], [acts_few]), content.score([few], [acts_few]))
