"""The RAG pipeline (dragonrec.rag) end to end on a tiny catalog with obvious neighbours (fake embedder, no model load)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dragonrec.data import Catalog, leave_one_out
from dragonrec.embed import HashEmbedder
from dragonrec.evaluate import evaluate_cases
from dragonrec.rag import RAGConfig, RAGPipeline
from dragonrec.scorers.base import Scorer, ScoreResult
from dragonrec.scorers.model import ModelScorer

TOPICS = {
    "lips": ["red lipstick matte", "red lipstick gloss", "red lip liner pencil", "red lip balm tint"],
    "hair": ["argan shampoo hair", "argan conditioner hair", "argan hair mask", "argan hair oil serum"],
    "nails": ["pink nail polish", "pink nail polish remover", "pink nail file", "pink nail top coat"],
}


def tiny_catalog() -> Catalog:
    rows = []
    for t, titles in TOPICS.items():
        for k, title in enumerate(titles):
            rows.append({"item_id": f"{t}{k}", "title": title, "brand": None, "category": f"Beauty > {t}",
                         "price": 5.0 + k, "description": None})
    return Catalog(pd.DataFrame(rows))


def tiny_events(cat: Catalog) -> pd.DataFrame:
    """Users stay within one topic; hair items are the most popular."""
    rows = []
    for u in range(30):
        t = ["lips", "hair", "hair", "nails"][u % 4]
        for s, k in enumerate(np.random.default_rng(u).permutation(4)[:3]):
            rows.append({"user_id": f"u{u:02d}", "item_id": f"{t}{k}", "action": "purchase", "timestamp": 1e6 + s,
                         "order": s, "item_idx": cat.index_of(f"{t}{k}")})
    return pd.DataFrame(rows)


@pytest.fixture
def fitted():
    cat = tiny_catalog()
    rag = RAGPipeline(RAGConfig(k=3), embedder=HashEmbedder()).fit(tiny_events(cat), cat)
    return rag, cat


def test_score_puts_same_topic_candidates_above_everything(fitted):
    rag, cat = fitted
    hist = np.array([cat.index_of("lips0")])
    s = rag.score([hist])[0]
    assert s.shape == (len(cat),) and s.dtype == np.float32
    top = np.argsort(-s)[:3]
    assert {cat.item_ids[i] for i in top} == {"lips1", "lips2", "lips3"}
    assert s[top].min() > 1.0 + 1e-5 >= np.delete(s, top).max()  # candidates above every similarity
    # below the candidates, the retrieval similarity keeps its order
    rest = np.delete(np.arange(len(cat)), top)
    sims = rag.item_vectors[rest] @ rag.item_vectors[hist[0]]
    assert np.argsort(-s[rest], kind="stable").tolist() == np.argsort(-sims, kind="stable").tolist()


def test_scorer_reorders_only_the_candidates(fitted):
    rag, _ = fitted

    class PreferLast(Scorer):
        name = "prefer-last"

        def score(self, request):
            return ScoreResult(np.arange(len(request.candidates), dtype=np.float32), ["because"] * len(request.candidates))

    plain = rag.score([np.array([0])])[0]
    rag.scorer = PreferLast()
    rescored = rag.score([np.array([0])])[0]
    order_plain = np.argsort(-plain)[:3]
    assert np.argsort(-rescored)[:3].tolist() == order_plain[::-1].tolist()
    np.testing.assert_array_equal(np.sort(np.argsort(-rescored)[3:]), np.sort(np.argsort(-plain)[3:]))


def test_recommend_for_returns_reasons_timings_and_excludes_history(fitted):
    rag, cat = fitted
    hist = [cat.index_of("hair0"), cat.index_of("hair1")]
    rec = rag.recommend_for(hist, ["view", "purchase"], n=2)
    assert len(rec.items) == 2 and all(i.startswith("hair") for i in rec.items)
    assert not set(rec.indices) & set(hist) and rec.source == "history" and not rec.degraded
    assert {"candidates_s", "score_s", "rerank_s", "total_s"} <= set(rec.timings)
    with pytest.raises(ValueError, match="outside the catalog"):
        rag.recommend_for([999])


def test_failing_scorer_degrades_to_retrieval_order(fitted):
    rag, cat = fitted
    expected = rag.recommend_for([cat.index_of("nails0")], n=3).items

    class Down(Scorer):
        name = "down"

        def score(self, request):
            return ScoreResult.fallback(len(request.candidates), "LLM failed after 4 request(s): HTTP 503")

    rag.scorer = Down()
    rec = rag.recommend_for([cat.index_of("nails0")], n=3)
    assert rec.degraded and "503" in rec.degraded_reason and rec.items == expected


def test_cold_start_from_preferences_then_popularity(fitted):
    rag, cat = fitted
    rec = rag.recommend_for([], context={"preferences": {"text": "pink nail polish"}}, n=2)
    assert rec.source == "preferences" and all(i.startswith("nails") for i in rec.items)
    rec = rag.recommend_for([], context={"preferences": "argan hair"}, n=2)
    assert all(i.startswith("hair") for i in rec.items)
    cold = rag.recommend_for([], n=3)
    assert cold.source == "cold_start" and cold.items[0].startswith("hair")  # the most popular topic
    assert rag.recommend_for([], n=3, exclude=[cat.index_of(cold.items[0])]).items[0] != cold.items[0]
    # a history of only negative actions is no signal either
    assert rag.recommend_for([0], ["scroll_past"], n=3).source == "cold_start"
    s = rag.score([np.zeros(0, np.int64)])[0]
    assert np.argmax(s) == cat.index_of(cold.items[0]) and s.max() < -1


def test_own_model_scorer_and_evaluation_run_end_to_end():
    cat = tiny_catalog()
    split = leave_one_out(tiny_events(cat))
    from dragonrec.recommenders.popularity import PopularityRecommender

    pop = PopularityRecommender().fit(split.train, cat)
    rag = RAGPipeline(RAGConfig(k=4), scorer=ModelScorer(pop), embedder=HashEmbedder()).fit(split.train, cat)
    res = evaluate_cases(rag, split.test, train=split.train)
    # every target is a same-topic item: retrieval finds it in the top 3 of 4 candidates after the history
    assert res["metrics"]["hr@5"] == 1.0


def test_save_and_load_give_the_same_scores(fitted, tmp_path):
    rag, cat = fitted
    rag.save(tmp_path / "rag")
    back = RAGPipeline.load(tmp_path / "rag", cat, embedder=HashEmbedder())
    h = [np.array([0, 5]), np.zeros(0, np.int64)]
    np.testing.assert_array_equal(back.score(h), rag.score(h))
    with pytest.raises(ValueError, match="rebuild"):
        RAGPipeline.load(tmp_path / "rag", cat, embedder=HashEmbedder(name="other"))


def test_catalog_update_embeds_only_changes_and_new_items_are_found(fitted):
    rag, cat = fitted
    emb = rag.embedder
    calls = emb.calls
    items = cat.items.copy()
    items = items[items["item_id"] != "lips3"]  # removed
    items.loc[items["item_id"] == "hair0", "title"] = "argan shampoo hair sulfate free"  # edited
    new = {"item_id": "lips9", "title": "red lipstick velvet matte", "brand": None, "category": "Beauty > lips",
           "price": 9.0, "description": None}
    new_cat = Catalog(pd.concat([items, pd.DataFrame([new])], ignore_index=True))
    counts = rag.update_catalog(new_cat)
    assert counts == {"added": 1, "removed": 1, "changed": 1}
    assert emb.calls - calls == 2  # only the edited and the new text were embedded
    assert len(rag.index) == len(new_cat) and rag.score([np.array([0])]).shape == (1, len(new_cat))
    rec = rag.recommend_for([new_cat.index_of("lips0")], n=3)
    assert "lips9" in rec.items and "lips3" not in rec.items
    # the new item has no popularity yet: the cold-start list explores it
    assert new_cat.index_of("lips9") in rag.cold.explore_pool
    # and the updated index answers like a rebuilt one
    rebuilt = RAGPipeline(RAGConfig(k=3), embedder=HashEmbedder()).fit(tiny_events(cat), new_cat)
    h = [np.array([new_cat.index_of("hair1")])]
    np.testing.assert_array_equal(np.argsort(-rag.score(h)[0])[:3], np.argsort(-rebuilt.score(h)[0])[:3])


def test_candidates_cold_seed_and_usage(fitted):
    rag, cat = fitted
    c = rag.candidates([np.array([cat.index_of("lips0")]), np.zeros(0, np.int64)])
    assert c.shape == (2, 3) and {cat.item_ids[i] for i in c[0]} == {"lips1", "lips2", "lips3"}
    assert c[1].tolist() == rag.cold.ranking()[:3].tolist()  # no signal: the cold-start list
    assert rag.candidates([np.array([0])], k=5).shape == (1, 5)
    # a request's seed picks the exploration order of the cold-start list
    for seed in (None, 1, 2):
        assert rag.recommend_for([], n=len(cat), seed=seed).indices == rag.cold.ranking(seed=seed).tolist()
    from dragonrec.recommenders.popularity import PopularityRecommender

    rag.scorer = ModelScorer(PopularityRecommender().fit(tiny_events(cat), cat))
    rec = rag.recommend_for([cat.index_of("hair0")], n=3)
    assert rec.usage.requests == 1 and rec.reasons == ["ranked by popularity"] * 3 and len(rec.scores) == 3
    rag.score([np.array([0]), np.array([5])])
    assert rag.last_usage.requests == 2 and rag.stats()["scorer"] == "model:popularity"


def test_a_pipeline_with_a_model_source_refuses_a_catalog_update(fitted):
    from dragonrec.pipeline import Pipeline, PipelineConfig
    from dragonrec.recommenders.popularity import PopularityRecommender

    _, cat = fitted
    pop = PopularityRecommender().fit(tiny_events(cat), cat)
    pipe = Pipeline(PipelineConfig(sources={"dense": 3, "popularity": 2}, model="popularity", scorer="none",
                                   rest="dense"), model=pop, embedder=HashEmbedder()).fit(tiny_events(cat), cat)
    smaller = Catalog(cat.items[cat.items["item_id"] != "lips3"].reset_index(drop=True))
    assert pipe.update_catalog(smaller) == {"added": 0, "removed": 1, "changed": 0}  # dense + popularity follow
    assert len(pipe.sources["popularity"].popularity) == len(smaller) == len(pipe.cold.popularity)
    pipe = Pipeline(PipelineConfig(sources={"dense": 3, "model": 2}, model="popularity", scorer="none"),
                    model=pop, embedder=HashEmbedder()).fit(tiny_events(cat), cat)
    with pytest.raises(ValueError, match="source 'model' cannot follow"):
        pipe.update_catalog(smaller)
    assert pipe.catalog is cat and len(pipe.sources["dense"].index) == len(cat)  # nothing was changed


class _FlakyScorer(Scorer):
    """Answers every other request with a reversed order; fails the rest (a timeout, say)."""

    name = "flaky"

    def __init__(self, fail_all: bool = False):
        self.calls, self.fail_all = 0, fail_all

    def score(self, request):
        self.calls += 1
        n = len(request.candidates)
        if self.fail_all or self.calls % 2 == 0:
            return ScoreResult.fallback(n, "flaky timed out after 30s")
        return ScoreResult(np.arange(n, dtype=np.float32), ["reversed"] * n)


def _write_tiny(tmp_path):
    cat = tiny_catalog()
    d = tmp_path / "tiny"
    d.mkdir()
    cat.items.to_parquet(d / "items.parquet")
    tiny_events(cat).drop(columns="item_idx").to_parquet(d / "interactions.parquet")
    return d


@pytest.mark.parametrize("fail_all", [False, True])
def test_a_failing_scorer_shows_in_the_report(tmp_path, fail_all):
    from dragonrec.evaluate.experiment import run_evaluation

    rag = RAGPipeline(RAGConfig(k=3), scorer=_FlakyScorer(fail_all), embedder=HashEmbedder())
    report = run_evaluation(_write_tiny(tmp_path), None, model=rag, quiet=True)
    deg = report["test_degradation"]
    assert deg["scorer"] == "flaky" and deg["requests"] == report["test"]["cases"] > 0
    assert deg["degraded_reasons"] == {"flaky timed out after 30s": deg["degraded"]}
    if fail_all:
        assert deg["degraded"] == deg["requests"]
        assert "fully degraded" in report["recommender"]  # never reported as the scorer's result
        assert any("retrieval-order numbers" in n for n in report["notes"])
    else:
        assert deg["degraded"] == deg["requests"] // 2
        assert any(f"{deg['degraded']} of {deg['requests']} scored requests fell back" in n for n in report["notes"])


def test_a_failing_scorer_shows_in_the_pipeline_report(tmp_path):
    from dragonrec.evaluate.experiment import run_evaluation
    from dragonrec.pipeline import Pipeline, PipelineConfig

    pipe = Pipeline(PipelineConfig.rag(k=3), scorer=_FlakyScorer(), embedder=HashEmbedder())
    report = run_evaluation(_write_tiny(tmp_path), None, model=pipe, quiet=True)
    deg = report["test_degradation"]
    assert deg["scored"] > 0 and deg["degraded"] == deg["scored"] // 2
    assert deg["degraded_reasons"] == {"flaky timed out after 30s": deg["degraded"]}
    assert any("scored requests fell back to retrieval order" in n for n in report["notes"])
