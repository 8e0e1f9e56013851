"""The pipeline: sources -> union -> scorer -> re-rank, one object for offline scores and online requests."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import beauty_first_users_events

from dragonrec.candidates.dense import Candidates
from dragonrec.candidates.sources import (
    DenseConfig,
    DenseSource,
    ModelSource,
    PopularitySource,
    top_k,
    union_candidates,
)
from dragonrec.data import leave_one_out
from dragonrec.embed import HashEmbedder
from dragonrec.evaluate import evaluate_cases
from dragonrec.evaluate.candidates import candidate_recall, scale_quotas
from dragonrec.pipeline import Pipeline, PipelineConfig, Reranker
from dragonrec.rag import RAGConfig, RAGPipeline
from dragonrec.recommenders.base import top_n
from dragonrec.recommenders.cooccurrence import CooccurrenceConfig, CooccurrenceRecommender
from dragonrec.scorers.base import Scorer, ScoreResult
from dragonrec.scorers.model import ModelScorer

QUOTAS = {"dense": 4, "cooccurrence": 3, "model": 3, "popularity": 2}
NO_CACHE = DenseConfig(cache_dir=None)


def union_config(scorer: str = "model:cooccurrence", **kw) -> PipelineConfig:
    # "model" is a second, wider co-occurrence model, so the sources disagree and the union has work to do
    return PipelineConfig.union(QUOTAS, model="cooccurrence", scorer=scorer, dense=NO_CACHE,
                                overrides={"cooccurrence": {"window": 1, "last_n": 1},
                                           "model": {"window": 4, "last_n": 3, "backward_weight": 1.0}}, **kw)


@pytest.fixture
def chain(chain_dataset):
    return chain_dataset, leave_one_out(chain_dataset.events)


@pytest.fixture
def pipe(chain):
    ds, split = chain
    return Pipeline(union_config(), embedder=HashEmbedder()).fit(split.train, ds.catalog)


def probe_histories(split):
    """Test histories with their actions, without actions, and with negative actions mixed in."""
    out = [(h, a) for h, a in zip(split.test.histories[:6], split.test.actions[:6])]
    out += [(h, None) for h in split.test.histories[6:9]]
    out += [(np.array([0, 1, 2, 5]), np.array(["purchase", "scroll_past", "view", "remove_from_cart"], dtype=object)),
            (np.array([7, 3]), np.array(["scroll_past", "click"], dtype=object)),
            (np.array([4]), None)]
    return out


# -- (a) what we measure is what we serve -------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["model:cooccurrence", "none"])
def test_offline_and_online_give_the_same_top_n(chain, scorer):
    ds, split = chain
    pipe = Pipeline(union_config(scorer), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    for h, a in probe_histories(split):
        offline = pipe.score([h], None if a is None else [a])[0]
        online = pipe.recommend_for(h, a, n=5)
        assert len(online) == 5 and all(r.sources for r in online)  # all five from the candidate path
        assert [r.idx for r in online] == top_n(offline, 5, exclude=h)
        assert pipe.recommend(h, n=5, actions=a) == [r.idx for r in online]  # the contract's form
    # and a batch scores each row as it would alone
    hs = [h for h, _ in probe_histories(split)[:6]]
    acts = [a for _, a in probe_histories(split)[:6]]
    batch = pipe.score(hs, acts)
    for b in range(len(hs)):
        np.testing.assert_array_equal(batch[b], pipe.score([hs[b]], [acts[b]])[0])


def test_pipeline_learns_the_chain_and_satisfies_the_contract(chain, pipe):
    ds, split = chain
    scores = pipe.score(split.test.histories[:7], split.test.actions[:7])
    assert scores.shape == (7, len(ds.catalog)) and scores.dtype == np.float32 and not np.isnan(scores).any()
    res = evaluate_cases(pipe, split.test, train=split.train)
    assert res["metrics"]["hr@5"] >= 0.9 and res["metrics"]["ndcg@10"] >= 0.8
    assert pipe.name == "pipeline" and pipe.config()["sources"] == QUOTAS


# -- (b) the union ------------------------------------------------------------------------------------------
def test_union_dedups_keeps_first_source_and_remembers_all():
    a = Candidates(np.array([[1, 2, 3, 4], [5, -1, -1, -1]]), np.zeros((2, 4), np.float32))
    b = Candidates(np.array([[3, 9, 1, 8], [5, 6, 7, -1]]), np.zeros((2, 4), np.float32))
    u = union_candidates({"a": a, "b": b}, {"a": 3, "b": 2})
    row = u.items[0][u.row(0)].tolist()
    assert sorted(row) == [1, 2, 3, 9]  # a's 4 and b's 1-beyond-quota (8) are out; 3 once
    owner = {int(u.items[0, j]): (u.names[u.primary[0, j]], u.sources_of(0, j)) for j in u.row(0)}
    assert owner[3] == ("a", ["a", "b"]) and owner[9] == ("b", ["b"]) and owner[1] == ("a", ["a"])
    assert row[0] == 3  # proposed by both: reciprocal-rank fusion puts it first
    assert u.items[1][u.row(1)].tolist() == [5, 6]


def test_quotas_respected_and_history_cart_page_item_never_recommended(chain, pipe):
    ds, _ = chain
    cat = ds.catalog
    h = np.array([cat.index_of("i03"), cat.index_of("i04")])
    ctx = {"cart": ["i08"], "item_id": "i05", "exclude": ["i00"]}
    recs = pipe.recommend_for(h, ["view", "purchase"], n=len(cat), context=ctx)
    got = [r.idx for r in recs]
    banned = set(h.tolist()) | {cat.index_of(i) for i in ("i08", "i05", "i00")}
    assert not set(got) & banned and len(got) == len(set(got)) == len(cat) - len(banned)
    listed = [r for r in recs if r.sources]  # the candidates; the rest is filled from the `rest` source
    assert 4 <= len(listed) <= sum(QUOTAS.values())
    for key, quota in QUOTAS.items():
        assert sum(r.source == key for r in listed) <= quota
    assert all(r.source == r.sources[0] for r in listed)  # the first by priority owns the item
    assert all(r.reason and r.item_id == cat.item_ids[r.idx] for r in recs)
    # every source's own top-quota (after the same exclusions) is in the list, with that source recorded
    full_h = np.concatenate([h, [cat.index_of("i08"), cat.index_of("i05")]])
    acts = np.array(["view", "purchase", "add_to_cart", "view"], dtype=object)
    by_idx = {r.idx: r for r in recs}
    for key, quota in QUOTAS.items():
        own = pipe.sources[key].candidates([full_h], [acts], quota, [np.array(sorted(banned))]).items[0]
        assert all(key in by_idx[int(i)].sources for i in own if i >= 0)
    # the contract's recommend honours exclusions too
    assert not set(pipe.recommend(h, n=5, exclude=[0, 1])) & {0, 1, *h.tolist()}


def test_reranker_hook_can_drop_items(chain):
    ds, split = chain

    class NoEven(Reranker):
        def rerank(self, items, scores, banned):
            keep = super().rerank(items, scores, banned)
            return keep[items[keep] % 2 == 1]

    pipe = Pipeline(union_config(), embedder=HashEmbedder(), reranker=NoEven()).fit(split.train, ds.catalog)
    recs = pipe.recommend_for(split.test.histories[0], n=4)
    assert recs and all(r.idx % 2 == 1 for r in recs if r.sources)


# -- (c) a failing scorer is counted and falls back to retrieval order --------------------------------------
class Flaky(Scorer):
    """Fails every other request, as an overloaded LLM endpoint would; otherwise reverses retrieval order."""

    name = "flaky"

    def __init__(self):
        self.calls = 0

    def score(self, request):
        self.calls += 1
        n = len(request.candidates)
        if self.calls % 2 == 0:
            return ScoreResult.fallback(n, "LLM failed after 4 request(s): HTTP 503")
        return ScoreResult(np.arange(n, dtype=np.float32), ["the scorer liked it"] * n)


def test_failing_scorer_is_counted_and_degraded_requests_keep_retrieval_order(chain, pipe):
    _, split = chain
    hs, acts = split.test.histories[:6], split.test.actions[:6]
    pipe.scorer = None
    retrieval = [[r.idx for r in pipe.recommend_for(h, a, n=12) if r.sources] for h, a in zip(hs, acts)]
    pipe.reset_stats()
    pipe.scorer = Flaky()
    offline = pipe.score(hs, acts)
    stats = pipe.stats()
    assert stats["requests"] == 6 and stats["scored"] == 6 and stats["degraded"] == 3
    assert stats["degraded_reasons"] == {"LLM failed after 4 request(s): HTTP 503": 3}
    for b in range(6):
        top = top_n(offline[b], len(retrieval[b]), exclude=hs[b])
        if b % 2 == 1:  # the 2nd, 4th and 6th requests failed: retrieval order
            assert top == retrieval[b]
        else:  # the scorer answered: its order (the reverse)
            assert top == retrieval[b][::-1]
    # online: the request says it was degraded, and keeps the retrieval order
    pipe.reset_stats()
    pipe.scorer.calls = 1
    rec = pipe.recommend_for(hs[0], acts[0], n=6)
    assert rec.degraded and "503" in rec.degraded_reason and [r.idx for r in rec if r.sources] == retrieval[0]
    assert pipe.stats()["degraded"] == 1 and pipe.stats()["requests"] == 1


def test_partly_answered_request_keeps_the_scores_it_got(chain, pipe):
    _, split = chain
    h, a = split.test.histories[0], split.test.actions[0]
    pipe.scorer = None
    retrieval = [r.idx for r in pipe.recommend_for(h, a, n=12) if r.sources]

    class Partial(Scorer):  # as an LLM that scored only the last two candidates
        name = "partial"

        def score(self, request):
            s = np.full(len(request.candidates), np.nan, dtype=np.float32)
            s[-2:] = [1.0, 2.0]
            return ScoreResult(s, [None] * len(s), True, f"LLM scored 2/{len(s)} candidates")

    pipe.scorer = Partial()
    pipe.reset_stats()
    rec = pipe.recommend_for(h, a, n=12)
    assert [r.idx for r in rec if r.sources] == [retrieval[-1], retrieval[-2], *retrieval[:-2]]
    assert rec.degraded and pipe.stats()["degraded_reasons"] == {f"LLM scored 2/{len(retrieval)} candidates": 1}


def test_scorer_that_raises_or_answers_garbage_degrades(chain, pipe):
    _, split = chain

    class Broken(Scorer):
        name = "broken"

        def score(self, request):
            raise RuntimeError("CUDA out of memory")

    class Short(Scorer):
        name = "short"

        def score(self, request):
            return ScoreResult(np.zeros(1, np.float32), [None])

    for scorer, text in ((Broken(), "RuntimeError: CUDA out of memory"), (Short(), "answered 1 scores")):
        pipe.scorer = scorer
        pipe.reset_stats()
        pipe.score(split.test.histories[:3], split.test.actions[:3])
        s = pipe.stats()
        assert s["degraded"] == 3 and any(text in r for r in s["degraded_reasons"])


# -- (d) cold users -----------------------------------------------------------------------------------------
def test_cold_user_gets_popularity(pipe):
    rec = pipe.recommend_for([], n=3)
    assert rec.cold and rec[0].source == "popularity" and {r.source for r in rec} <= {"popularity", "cold_start"}
    most_popular = int(np.argmax(pipe.cold.popularity))
    assert rec[0].idx == most_popular
    assert int(np.argmax(pipe.score([np.zeros(0, np.int64)])[0])) == most_popular
    # only negative signal is no signal; stated preferences are
    assert pipe.recommend_for([3], ["scroll_past"], n=3).cold
    warm = pipe.recommend_for([], n=12, context={"preferences": "Product number 7 Hair"})
    assert not warm.cold and any("dense" in r.sources for r in warm)
    # stated categories and no positive event: the segment's popular items (the default, chosen on validation)
    cats = np.asarray(pipe.catalog.categories, dtype=object)
    hair = pipe.recommend_for([], n=4, context={"preferences": {"categories": ["Beauty > Hair"]}})
    assert hair.source == "preferences" and sum(cats[r.idx] == "Beauty > Hair" for r in hair) >= 3
    # free text: the preference query alone orders the list (no popularity replay)
    text = pipe.recommend_for([], n=4, context={"preferences": {"text": "Hair", "categories": ["Beauty > Hair"]}})
    assert {r.source for r in text} == {"dense"}
    assert sum(cats[r.idx] == "Beauty > Hair" for r in text) >= 3, [cats[r.idx] for r in text]
    with pytest.raises(ValueError, match="cartt"):
        pipe.recommend_for([1], context={"cartt": ["i01"]})
    with pytest.raises(KeyError, match="unknown item"):
        pipe.recommend_for([1], context={"cart": ["nope"]})


# -- the parts, from config alone or handed in ----------------------------------------------------------------
def test_rag_preset_and_fitted_parts_are_not_refitted(chain):
    ds, split = chain
    cooc = CooccurrenceRecommender(CooccurrenceConfig(window=1, last_n=1)).fit(split.train, ds.catalog)
    rag = Pipeline(PipelineConfig.rag(k=5, model="cooccurrence", scorer="model", dense=NO_CACHE),
                   model=cooc, embedder=HashEmbedder()).fit(split.train, ds.catalog)
    assert rag.model is cooc and rag.scorer.model is cooc and list(rag.sources) == ["dense"]
    recs = rag.recommend_for(split.test.histories[0], split.test.actions[0], n=7)
    assert [r.source for r in recs] == ["dense"] * 7
    assert [bool(r.sources) for r in recs] == [True] * 5 + [False] * 2  # 5 candidates, then filled by similarity
    with pytest.raises(ValueError, match="rest"):
        PipelineConfig(sources={"dense": 5}, rest="model")
    # hand-made sources: any fitted model's top-K, popularity
    mine = Pipeline(PipelineConfig(sources={"cooc": 4, "pop": 2}, scorer="none", rest="cooc"),
                    sources={"cooc": ModelSource(cooc), "pop": PopularitySource()}).fit(split.train, ds.catalog)
    assert {r.source for r in mine.recommend_for(split.test.histories[0], n=6)} <= {"cooc", "pop"}


def test_built_from_config_alone_fits_the_model_once_for_source_and_scorer(chain, monkeypatch):
    ds, split = chain
    fits = []
    real_fit = CooccurrenceRecommender.fit
    monkeypatch.setattr(CooccurrenceRecommender, "fit", lambda self, *a, **k: fits.append(self) or real_fit(self, *a, **k))
    cfg = PipelineConfig.union({"dense": 3, "model": 4, "cooccurrence": 2}, model="cooccurrence", scorer="model",
                               dense=NO_CACHE)
    pipe = Pipeline(cfg, embedder=HashEmbedder()).fit(split.train, ds.catalog, valid=split.valid)
    # "model" and "cooccurrence" name the same recommender with the same settings: one fit serves all three
    assert len(fits) == 1 and pipe.model is pipe.scorer.model is pipe.sources["cooccurrence"].model
    assert pipe.sources["model"].model is pipe.model and pipe.model.name == "cooccurrence"
    for h, a in zip(split.test.histories[:5], split.test.actions[:5]):
        assert [r.idx for r in pipe.recommend_for(h, a, n=5)] == top_n(pipe.score([h], [a])[0], 5, exclude=h)


def test_rag_preset_ranks_like_the_rag_recommender(chain):
    ds, split = chain
    cooc = CooccurrenceRecommender().fit(split.train, ds.catalog)
    rag = RAGPipeline(RAGConfig(k=5), scorer=ModelScorer(cooc), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    assert rag.cfg == PipelineConfig.rag(k=5, scorer="none", dense=NO_CACHE, scorer_history=20)
    pipe = Pipeline(PipelineConfig.rag(k=5, scorer="none", dense=NO_CACHE), scorer=ModelScorer(cooc),
                    embedder=HashEmbedder()).fit(split.train, ds.catalog)
    hs, acts = split.test.histories[:20], split.test.actions[:20]
    a, b = rag.score(hs, acts), pipe.score(hs, acts)
    for i, h in enumerate(hs):
        assert top_n(a[i], 7, exclude=h) == top_n(b[i], 7, exclude=h)
        assert pipe.recommend(h, n=5, actions=acts[i]) == rag.recommend_for(h, acts[i], n=5).indices


def test_top_k_is_batch_independent_and_breaks_ties_by_index():
    s = np.array([[1, 3, 3, 3, 0, -np.inf], [5, 5, 5, 5, 5, 5]], dtype=np.float32)
    c = top_k(s, 3, exclude=[np.array([1]), None])
    assert c.items.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert top_k(s[:1], 3, exclude=[np.array([1])]).items.tolist() == [[2, 3, 0]]
    assert top_k(s[:1], 6).items.tolist() == [[1, 2, 3, 0, 4, -1]]
    assert scale_quotas({"a": 100, "b": 100, "c": 50}, 50) == {"a": 20, "b": 20, "c": 10}


# -- (e) candidate recall on a real slice ---------------------------------------------------------------------
def test_candidate_recall_on_a_beauty_slice():
    catalog, events = beauty_first_users_events(1500)  # the slice's own catalog, so that embedding stays fast
    split = leave_one_out(events)
    cooc = CooccurrenceRecommender().fit(split.train, catalog)
    sources = {"dense": DenseSource(NO_CACHE, embedder=HashEmbedder()), "cooccurrence": ModelSource(cooc),
               "popularity": PopularitySource()}
    for s in sources.values():
        s.fit(split.train, catalog)
    quotas = {"dense": 60, "cooccurrence": 60, "popularity": 30}
    rep = candidate_recall(sources, split.test, ks=(50, 100, 200), quotas=quotas)
    assert rep["cases"] == len(split.test) > 1000
    for name in [*sources, "union"]:
        r = [(rep["sources"].get(name) or rep["union"])[f"recall@{k}"] for k in (50, 100, 200)]
        assert all(0.0 <= x <= 1.0 for x in r) and r[0] <= r[1] <= r[2], (name, r)
    assert rep["sources"]["cooccurrence"]["recall@200"] > rep["sources"]["popularity"]["recall@200"]
    u = rep["union_configured"]
    assert u["total"] == 150 and 60 <= u["size"] <= 150
    assert u["recall"] >= max(rep["sources"][s][f"recall@{q}"] for s, q in (("dense", 50), ("cooccurrence", 50)))
    # the union at its configured quotas holds every source's own top items
    hist, acts = split.test.histories[:50], split.test.actions[:50]
    found = {s: src.candidates(hist, acts, quotas[s], list(hist)) for s, src in sources.items()}
    union = union_candidates(found, quotas)
    for b in range(50):
        members = set(union.items[b][union.row(b)].tolist())
        for s, c in found.items():
            assert set(c.items[b][c.items[b] >= 0].tolist()) <= members
