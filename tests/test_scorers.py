"""The scorer interface (ordering, fallback) and the own-model scorer over a fitted Recommender."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dragonrec.data import Catalog
from dragonrec.recommenders.base import Recommender
from dragonrec.scorers.base import ItemView, ScoreRequest, ScoreResult, Usage
from dragonrec.scorers.model import ModelScorer


class FavoursLastPlusOne(Recommender):
    """Scores item (last history item + 1) highest, then by index; item 0 is unscorable (-inf)."""

    name = "next"

    def fit(self, train, catalog, valid=None):
        self.catalog = catalog
        return self

    def score(self, histories, actions=None):
        n = len(self.catalog)
        out = np.tile(np.arange(n, dtype=np.float32) / n, (len(histories), 1))
        for b, h in enumerate(histories):
            out[b, (int(h[-1]) + 1) % n] = 10.0
        out[:, 0] = -np.inf
        self.calls = getattr(self, "calls", 0) + 1
        return out


def catalog(n: int = 10) -> Catalog:
    return Catalog(pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "title": [f"t{k}" for k in range(n)]}))


def req(history, cands) -> ScoreRequest:
    return ScoreRequest([ItemView(h, f"t{h}", "purchase") for h in history], [ItemView(c, f"t{c}") for c in cands],
                        retrieval_scores=np.linspace(1, 0, len(cands)).astype(np.float32))


def test_order_by_score_then_retrieval_with_unscored_last():
    r = ScoreResult(np.array([1.0, np.nan, 5.0, 1.0], np.float32), [None] * 4)
    assert r.order(np.array([0.1, 0.9, 0.2, 0.3])).tolist() == [2, 3, 0, 1]
    fb = ScoreResult.fallback(3, "down")
    assert fb.degraded and fb.degraded_reason == "down" and fb.order(np.array([0.1, 0.3, 0.2])).tolist() == [1, 2, 0]


def test_usage_adds_up():
    u = Usage()
    u += Usage(requests=2, prompt_tokens=10, cost_usd=0.5)
    u += Usage(requests=1, cache_hits=1, completion_tokens=3, cost_usd=0.25)
    assert (u.requests, u.cache_hits, u.prompt_tokens, u.completion_tokens, u.cost_usd) == (3, 1, 10, 3, 0.75)


def test_model_scorer_ranks_candidates_by_the_models_scores_in_one_call():
    model = FavoursLastPlusOne().fit(None, catalog())
    scorer = ModelScorer(model)
    results = scorer.score_batch([req([3], [2, 4, 9, 0]), req([7], [1, 8, 5])])
    assert model.calls == 1  # one batched score() for all requests
    a, b = results
    assert a.order(np.linspace(1, 0, 4)).tolist() == [1, 2, 0, 3]  # 4 (=3+1) first, unscorable 0 last
    assert np.isnan(a.scores[3]) and not a.degraded
    assert b.order(np.linspace(1, 0, 3)).tolist() == [1, 2, 0]
    assert scorer.name == "model:next" and a.reasons[0] == "ranked by next"


def test_model_scorer_failure_degrades_instead_of_raising():
    class Broken(FavoursLastPlusOne):
        def score(self, histories, actions=None):
            raise RuntimeError("weights missing")

    (res,) = ModelScorer(Broken().fit(None, catalog())).score_batch([req([1], [2, 3])])
    assert res.degraded and "weights missing" in res.degraded_reason and np.isnan(res.scores).all()


def test_item_views_are_built_only_when_a_scorer_reads_them():
    """The pipeline hands scorers `ItemViews`: a model scorer reads indices and actions without building a view;
    a language-model scorer iterates them as a list of `ItemView`."""
    from dragonrec.scorers.base import ItemViews, item_actions, item_indices

    views = ItemViews(np.array([2, 0]), ["a", "b", "c"], ["view", None])
    assert len(views) == 2 and item_indices(views).tolist() == [2, 0] and item_actions(views) == ["view", None]
    assert views._views is None  # nothing built yet
    assert list(views) == [ItemView(2, "c", "view"), ItemView(0, "a", None)] and views[1].text == "a"
    assert views == [ItemView(2, "c", "view"), ItemView(0, "a", None)]
    plain = [ItemView(5, "x", "purchase")]
    assert item_indices(plain).tolist() == [5] and item_actions(plain) == ["purchase"]
    assert item_actions(ItemViews(np.array([1]), ["p", "q"])) == [None]
    with pytest.raises(ValueError, match="1 actions for 2 items"):
        ItemViews(np.array([0, 1]), ["p", "q"], ["view"])
