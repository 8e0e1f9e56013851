"""The re-rank stage: MMR on hand-made vectors, category caps, calibration, shop rules and filters, and the
diversity knob through the pipeline on a real Beauty slice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import beauty_first_users_events

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import Catalog, leave_one_out
from dragonrec.embed import HashEmbedder
from dragonrec.evaluate.metrics import intra_list_diversity
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.rerank import DiversityReranker, Filters, RerankConfig, Reranker, RerankRequest, category_key

NO_CACHE = DenseConfig(cache_dir=None)


def catalog_of(categories, prices=None, brands=None, **extra) -> Catalog:
    n = len(categories)
    return Catalog(pd.DataFrame({
        "item_id": [f"i{k:02d}" for k in range(n)], "title": [f"item {k}" for k in range(n)],
        "brand": brands or ["acme"] * n, "category": categories,
        "price": prices if prices is not None else [10.0] * n, **extra}))


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def two_clusters() -> np.ndarray:
    """a0 a1 a2 along an arc near e0, b0 b1 b2 along an arc near e1: a0-a2 and b0-b2 are the farthest pairs."""
    a = [unit([1, 0, t, 0]) for t in (0.0, 0.5, 1.0)]
    b = [unit([0, 1, 0, t]) for t in (0.0, 0.5, 1.0)]
    return np.stack(a + b)


def rerank(r: DiversityReranker, items, scores=None, banned=(), **request) -> list[int]:
    items = np.asarray(items, dtype=np.int64)
    scores = np.linspace(1.0, 0.0, len(items)) if scores is None else np.asarray(scores, dtype=np.float64)
    req = RerankRequest(np.asarray(request.pop("history", []), dtype=np.int64), **request)
    return items[r.rerank_for(items, scores, np.asarray(banned, dtype=np.int64), req)].tolist()


# -- MMR ------------------------------------------------------------------------------------------------------
def test_lambda_zero_keeps_the_exact_input_order():
    cat = catalog_of(["A"] * 6)
    r = DiversityReranker(RerankConfig(diversity=0.0)).fit(cat, two_clusters())
    order = [3, 0, 5, 1, 4, 2]
    # scores not monotone along the list (a scorer's and retrieval's scores mixed): the order still holds
    assert rerank(r, order, scores=[0.1, 5.0, 0.2, -1.0, 3.0, 0.0]) == order
    assert rerank(r, order, banned=[5, 1]) == [3, 0, 4, 2]
    # lambda 0 through the greedy path too (a cap that never binds forces it)
    capped = DiversityReranker(RerankConfig(diversity=0.0, category_cap=100)).fit(cat, two_clusters())
    assert rerank(capped, order, scores=[0.1, 5.0, 0.2, -1.0, 3.0, 0.0]) == order


def test_lambda_one_alternates_clusters_and_keeps_the_top_item():
    cat = catalog_of(["A"] * 6)
    r = DiversityReranker(RerankConfig(diversity=1.0)).fit(cat, two_clusters())
    out = rerank(r, [0, 1, 2, 3, 4, 5])
    cluster = ["a" if i < 3 else "b" for i in out]
    assert out[0] == 0 and cluster == ["a", "b", "a", "b", "a", "b"]
    assert out[:4] == [0, 3, 2, 5]  # after each cluster's first, the member farthest from it
    assert rerank(DiversityReranker().fit(cat, two_clusters()), [0, 1, 2, 3, 4, 5]) == [0, 1, 2, 3, 4, 5]


def test_the_request_overrides_the_configured_diversity_and_more_diversity_spreads_more():
    cat = catalog_of(["A"] * 6)
    vec = two_clusters()
    r = DiversityReranker(RerankConfig(diversity=0.0)).fit(cat, vec)
    base = [0, 1, 2, 3, 4, 5]
    assert rerank(r, base, diversity=1.0) == rerank(DiversityReranker(RerankConfig(diversity=1.0)).fit(cat, vec), base)
    ild = [intra_list_diversity([rerank(r, base, diversity=d)[:3]], embeddings=vec) for d in (0.0, 0.3, 0.6, 1.0)]
    assert ild == sorted(ild) and ild[-1] > ild[0]
    with pytest.raises(ValueError, match="item vectors"):
        rerank(DiversityReranker().fit(cat), base, diversity=0.5)


def test_dpp_picks_across_clusters_and_its_knob_at_zero_changes_nothing():
    cat = catalog_of(["A"] * 6)
    vec = two_clusters()
    base = [0, 1, 2, 3, 4, 5]
    dpp = DiversityReranker(RerankConfig(diversity=0.0, mode="dpp")).fit(cat, vec)
    assert rerank(dpp, base) == base
    # strong diversity: the second pick leaves cluster a (volume, not relevance, decides)
    out = rerank(dpp, base, diversity=0.9)
    assert out[0] == 0 and out[1] >= 3
    ild = [intra_list_diversity([rerank(dpp, base, diversity=d)[:3]], embeddings=vec) for d in (0.0, 0.5, 0.9)]
    assert ild[0] < ild[-1]
    # Chen et al.'s greedy DPP on the kernel diag(q) S diag(q): the next pick maximises log det of the chosen
    q = np.exp((1 - 0.9) / (2 * 0.9) * (np.linspace(1.0, 0.0, 6) - 1.0))
    L = np.outer(q, q) * (vec @ vec.T)
    picked = [0]
    for _ in range(2):
        rest = [j for j in range(6) if j not in picked]
        picked.append(max(rest, key=lambda j: np.linalg.slogdet(L[np.ix_(picked + [j], picked + [j])])[1]))
    assert out[:3] == picked


@pytest.mark.parametrize("mode", ["mmr", "dpp"])
def test_probability_relevance_spreads_a_flat_list_and_keeps_a_confident_ones_head(mode):
    """Two lists in the same order whose scores differ by a factor of 100: min-max relevance sees the same list
    twice; as probabilities (log-scale scores) the confident one keeps its runner-up, the flat one spreads."""
    cat = catalog_of(["A"] * 6)
    vec = two_clusters()
    order = [0, 1, 2, 3, 4, 5]  # a0 a1 a2 b0 b1 b2
    confident = np.asarray([8.0, 7.0, 6.0, 1.0, 0.5, 0.0])
    flat = confident / 100
    minmax = DiversityReranker(RerankConfig(diversity=0.3, mode=mode)).fit(cat, vec)
    assert rerank(minmax, order, scores=confident) == rerank(minmax, order, scores=flat)
    prob = DiversityReranker(RerankConfig(diversity=0.3, mode=mode, relevance="probability")).fit(cat, vec)
    assert rerank(prob, order, scores=confident)[:2] == [0, 1]
    assert rerank(prob, order, scores=flat)[:2] == [0, 3]
    # knob 0 keeps the order whatever the scores (non-finite and out-of-order ones included)
    off = DiversityReranker(RerankConfig(mode=mode, relevance="probability", category_cap=100)).fit(cat, vec)
    assert rerank(off, order, scores=[0.1, 5.0, -np.inf, -1.0, 3.0, 0.0]) == order


def test_novelty_demotes_items_every_user_gets_only_when_the_knob_is_on():
    cat = catalog_of(["A"] * 4)
    vec = np.eye(4, dtype=np.float32)  # all equally dissimilar: only relevance and novelty decide
    pop = np.asarray([1000.0, 1.0, 1.0, 1.0])
    r = DiversityReranker(RerankConfig(novelty=2.0)).fit(cat, vec, popularity=pop)
    assert rerank(r, [0, 1, 2, 3]) == [0, 1, 2, 3]  # knob 0: nothing changes
    assert rerank(r, [0, 1, 2, 3], diversity=0.5)[0] == 1  # the bestseller drops
    with pytest.raises(ValueError, match="popularity"):
        DiversityReranker(RerankConfig(novelty=1.0)).fit(cat, vec)


# -- category caps and calibration ----------------------------------------------------------------------------
def test_category_caps_hold_in_the_head_while_the_candidates_allow():
    cats = ["X"] * 6 + ["Y"] * 4 + ["", ""]
    r = DiversityReranker(RerankConfig(category_cap=2, head=10)).fit(catalog_of(cats))
    out = rerank(r, list(range(12)))
    assert sorted(out) == list(range(12))
    assert out[:6] == [0, 1, 6, 7, 10, 11]  # two X, two Y, the unknown-category items are never capped
    assert out[6:] == [2, 3, 4, 5, 8, 9]  # what the caps held back follows, in order
    # the cap is per category at a depth of the path
    deep = ["B > Hair > Shampoo", "B > Hair > Conditioner", "B > Hair > Oil", "B > Skin > Lotion", "B > Skin > Oil"]
    r2 = DiversityReranker(RerankConfig(category_cap=1, category_depth=2)).fit(catalog_of(deep))
    assert rerank(r2, [0, 1, 2, 3, 4])[:2] == [0, 3]
    assert category_key("B > Hair > Oil", 2) == "B > Hair" and category_key("", 2) == ""


def test_calibration_moves_the_category_mix_toward_the_history():
    cats = ["Y"] * 8 + ["X"] * 8 + ["X", "X", "X", "Y"]  # items 16..19 are the history (3 X, 1 Y)
    cat = catalog_of(cats)
    history = np.array([16, 17, 18, 19])
    plain = DiversityReranker().fit(cat)
    some = DiversityReranker(RerankConfig(calibration=1.0)).fit(cat)
    calibrated = DiversityReranker(RerankConfig(calibration=20.0)).fit(cat)
    items = list(range(16))  # the 8 Y items are the most relevant

    def share_x(lst):
        return float(np.mean([cats[i] == "X" for i in lst[:8]]))

    mix = [share_x(rerank(r, items, history=history)) for r in (plain, some, calibrated)]
    assert mix[0] == 0.0 < mix[1] < mix[2] <= 0.75, mix  # toward the history's 3:1 mix
    # with relevance flat, the greedy KL list matches the mix exactly
    assert share_x(rerank(some, items, scores=np.ones(16), history=history)) == 0.75
    assert calibrated.interest_mix(history, None) == {int(calibrated.category_codes[16]): 0.75,
                                                      int(calibrated.category_codes[19]): 0.25}
    # only positive events set the interests: a scrolled-past Y leaves the mix to X alone
    acts = np.array(["purchase", "scroll_past"], dtype=object)
    assert calibrated.interest_mix(np.array([16, 19]), acts) == {int(calibrated.category_codes[16]): 1.0}
    # without a history there is nothing to calibrate to
    assert rerank(calibrated, items) == items


# -- shop rules -----------------------------------------------------------------------------------------------
def test_bought_items_are_excluded_unless_their_category_may_be_rebought():
    cat = catalog_of(["Beauty > Hair Care > Shampoos", "Beauty > Tools > Brushes", "Beauty > Tools > Combs"])
    history, acts = np.array([0, 1, 2]), np.array(["purchase", "purchase", "view"], dtype=object)
    r = DiversityReranker(RerankConfig(rebuy_categories=["shampoo"])).fit(cat)
    assert r.excluded(RerankRequest(history, acts)).tolist() == [1]
    assert DiversityReranker().fit(cat).excluded(RerankRequest(history, acts)).tolist() == [0, 1]
    assert DiversityReranker(RerankConfig(exclude_bought=False)).fit(cat).excluded(
        RerankRequest(history, acts)).tolist() == []
    assert r.excluded(RerankRequest(history, None)).tolist() == []  # unknown actions: nothing known bought


def test_out_of_stock_and_hidden_items_are_excluded():
    cat = catalog_of(["A"] * 6, in_stock=[True, False, True, True, True, True], stock=[5, 3, 0, np.nan, 2, 1],
                     hidden=[False, False, False, False, True, False])
    r = DiversityReranker(RerankConfig(hidden_items=["i05", "unknown"])).fit(cat)
    assert r.excluded(RerankRequest(np.zeros(0, np.int64))).tolist() == [1, 2, 4, 5]
    r.hide(["i00"])
    r.hide(["i05"], hidden=False)
    assert r.excluded(RerankRequest(np.zeros(0, np.int64))).tolist() == [0, 1, 2, 4]
    assert DiversityReranker(RerankConfig(stock_attributes=False)).fit(cat).excluded(
        RerankRequest(np.zeros(0, np.int64))).tolist() == []


def test_filters_by_category_brand_and_price():
    cat = catalog_of(["Beauty > Hair Care", "Beauty > Skin Care", "Beauty > Hair Care > Oils", "Beauty > Nails"],
                     prices=[5.0, 20.0, np.nan, 50.0], brands=["Acme", "Zenith", "acme", "Zenith"])
    r = DiversityReranker().fit(cat)

    def kept(**f):
        out = set(r.excluded(RerankRequest(np.zeros(0, np.int64), filters=Filters(**f))).tolist())
        return sorted(set(range(4)) - out)

    assert kept(categories=["hair care"]) == [0, 2]
    assert kept(exclude_categories=["HAIR"]) == [1, 3]
    assert kept(brands=["ACME"]) == [0, 2]
    assert kept(min_price=10) == [1, 3]  # no price: out with a price bound
    assert kept(max_price=20) == [0, 1]
    assert kept(categories=["care"], max_price=10) == [0]
    with pytest.raises(ValueError, match="min_price"):
        Filters(min_price=10, max_price=5)


# -- through the pipeline -------------------------------------------------------------------------------------
# -- cold-item slots ---------------------------------------------------------------------------------------
def test_cold_items_take_the_last_slots_closest_in_text_to_the_history_first():
    cat = catalog_of(["A"] * 8)
    vec = np.concatenate([two_clusters(), unit([[1, 0, 0.2, 0], [0, 1, 0, 0.2]])])  # 6: near a0, 7: near b0
    pop = np.array([5, 4, 3, 5, 4, 3, 0, 0])  # items 6 and 7: nobody has interacted with them yet
    cfg = RerankConfig(cold_item_slots=1, cold_item_position=4)
    r = DiversityReranker(cfg).fit(cat, vec, popularity=pop)
    order = [1, 2, 3, 4, 5, 7, 6, 0]
    # history near cluster a: item 6 (the a-like cold item) takes position 4; the rest keep their order
    assert rerank(r, order, history=[0]) == [1, 2, 3, 6, 4, 5, 7, 0]
    assert rerank(r, order, history=[3]) == [1, 2, 3, 7, 4, 5, 6, 0]  # history near b: item 7
    two = DiversityReranker(cfg.model_copy(update={"cold_item_slots": 2})).fit(cat, vec, popularity=pop)
    assert rerank(two, order, history=[0]) == [1, 2, 6, 7, 3, 4, 5, 0]  # closest first
    assert rerank(r, order, history=[0], n=2) == [1, 6, 2, 3, 4, 5, 7, 0]  # a shorter list: its last slot
    # a cold item already in the list's head fills the slot; no history, no slots, or below the threshold: as is
    assert rerank(r, [6, 1, 2, 3, 7], history=[3]) == [6, 1, 2, 3, 7]
    assert rerank(r, order) == order
    assert rerank(DiversityReranker().fit(cat, vec, popularity=pop), order, history=[0]) == order
    strict = DiversityReranker(cfg.model_copy(update={"cold_item_min_similarity": 0.99})).fit(cat, vec, popularity=pop)
    assert rerank(strict, order, history=[0]) == order
    assert rerank(r, order, history=[0], banned=[6]) == [1, 2, 3, 7, 4, 5, 0]  # a banned one never comes back


def test_cold_item_slots_by_score_take_the_cold_items_the_scorer_placed_highest():
    cat = catalog_of(["A"] * 8)
    vec = np.concatenate([two_clusters(), unit([[1, 0, 0.2, 0], [0, 1, 0, 0.2]])])
    pop = np.array([5, 4, 3, 5, 4, 3, 0, 0])
    cfg = RerankConfig(cold_item_slots=1, cold_item_position=4, cold_item_rank="score")
    r = DiversityReranker(cfg).fit(cat, vec, popularity=pop)
    # the list (the scorer's order) has item 7 above item 6: 7 takes the slot although 6 reads closer to history 0
    assert rerank(r, [1, 2, 3, 4, 5, 7, 6, 0], history=[0]) == [1, 2, 3, 7, 4, 5, 6, 0]
    assert rerank(r, [1, 2, 3, 4, 5, 6, 7, 0], history=[0]) == [1, 2, 3, 6, 4, 5, 7, 0]
    # the similarity threshold still holds: item 7 is far from history 0's text
    strict = DiversityReranker(cfg.model_copy(update={"cold_item_min_similarity": 0.5})).fit(cat, vec, popularity=pop)
    assert rerank(strict, [1, 2, 3, 4, 5, 7, 6, 0], history=[0]) == [1, 2, 3, 4, 5, 7, 6, 0]


# -- cross-category ("goes with") places ----------------------------------------------------------------------
def test_cross_category_places_lift_the_best_items_of_other_top_level_categories():
    # top level below the shared root "Beauty": Makeup (0-3), Skin Care (4-5), Hair Care (6), none (7)
    cat = catalog_of(["Beauty > Makeup > Eyes", "Beauty > Makeup > Lips", "Beauty > Makeup > Face",
                      "Beauty > Makeup > Eyes", "Beauty > Skin Care > Face", "Beauty > Skin Care > Body",
                      "Beauty > Hair Care", ""])
    cfg = RerankConfig(cross_category_slots=1, cross_category_position=3)
    r = DiversityReranker(cfg).fit(cat)
    order = [1, 2, 7, 5, 6, 4]  # item 7 has no category: it never counts as another category's
    # the last item bought is Makeup: the first non-Makeup item below position 3 (item 5) ends on position 3
    assert rerank(r, order, history=[0]) == [1, 2, 5, 7, 6, 4]
    assert rerank(r, order, history=[4, 0]) == [1, 2, 5, 7, 6, 4]  # the latest positive item is the anchor
    # anchored on Skin Care, items 1 and 2 (Makeup) are already of another category: nothing moves
    assert rerank(r, order, history=[0, 4]) == order
    two = DiversityReranker(cfg.model_copy(update={"cross_category_slots": 2})).fit(cat)
    assert rerank(two, order, history=[3]) == [1, 5, 6, 2, 7, 4]  # two places end on position 3, list order kept
    assert rerank(r, order, history=[0], n=2) == [1, 5, 2, 7, 6, 4]  # a shorter list: its last place
    assert rerank(r, order, history=[0], actions=np.array(["scroll_past"], dtype=object)) == order  # no positive
    assert rerank(r, order, history=[7]) == order  # an anchor of unknown category: as is
    assert rerank(r, order) == order  # no history
    assert rerank(r, order, history=[0], banned=[5]) == [1, 2, 6, 7, 4]  # a banned item never comes back
    assert rerank(DiversityReranker().fit(cat), order, history=[0]) == order  # off by default
    # a preferred source (the mined "goes with" links) fills the places first, in its own order
    pref = DiversityReranker(cfg.model_copy(update={"cross_category_source": "complements"})).fit(cat)
    assert pref.reads_sources and not r.reads_sources
    ranks = np.zeros((6, 2), dtype=np.int32)
    ranks[:, 0] = np.arange(1, 7)  # the model proposed all, in list order
    ranks[4, 1], ranks[5, 1] = 2, 1  # complements proposed items 6 (rank 2) and 4 (rank 1)
    src = (["model", "complements"], ranks)
    assert rerank(pref, order, history=[0], sources=src) == [1, 2, 4, 7, 5, 6]
    assert rerank(pref.__class__(pref.cfg.model_copy(update={"cross_category_slots": 2})).fit(cat), order,
                  history=[0], sources=src) == [1, 6, 4, 2, 7, 5]  # both proposals, in the list's order
    assert rerank(pref, order, history=[0]) == [1, 2, 5, 7, 6, 4]  # no sources known: the list's order
    assert rerank(pref, order, history=[0], sources=src, banned=[4]) == [1, 2, 6, 7, 5]


def chain_config(rerank: RerankConfig | None) -> PipelineConfig:
    return PipelineConfig.union({"dense": 4, "cooccurrence": 3, "popularity": 2}, model="cooccurrence",
                                scorer="model:cooccurrence", rest="cooccurrence", dense=NO_CACHE, rerank=rerank)


def test_pipeline_default_is_unchanged_and_filters_hold_in_fill_and_cold_lists(chain_dataset):
    ds = chain_dataset
    split = leave_one_out(ds.events)
    plain = Pipeline(chain_config(None), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    knob = Pipeline(chain_config(RerankConfig()), embedder=HashEmbedder()).fit(split.train, ds.catalog)
    assert type(plain.reranker) is Reranker and isinstance(knob.reranker, DiversityReranker)
    h, a = split.test.histories[:8], split.test.actions[:8]
    for hist, acts in zip(h, a):
        assert plain.recommend_for(hist, acts, 6).items == knob.recommend_for(hist, acts, 6).items
    # offline scores too; bought items (every chain event is a purchase) drop below everything, as served
    s_plain, s_knob = plain.score(h, a), knob.score(h, a)
    bought = np.zeros_like(s_plain, dtype=bool)
    for b, hist in enumerate(h):
        bought[b, hist] = True
    np.testing.assert_array_equal(s_plain[~bought], s_knob[~bought])
    assert (s_knob[bought] == -np.inf).all()
    rebuy = Pipeline(chain_config(RerankConfig(exclude_bought=False)), embedder=HashEmbedder())
    np.testing.assert_array_equal(s_plain, rebuy.fit(split.train, ds.catalog).score(h, a))
    with pytest.raises(ValueError, match="DiversityReranker"):
        plain.recommend_for(h[0], a[0], 5, {"diversity": 0.5})
    # filters hold for the scored list, the fill below it, and a cold user's list
    f = {"categories": ["hair"], "max_price": 19}
    for hist, acts in [(h[0], a[0]), ([], None)]:
        recs = knob.recommend_for(hist, acts, 10, {"filters": f, "diversity": 0.5})
        assert recs.items and all(ds.catalog.categories[i].endswith("Hair") and ds.catalog.items.price[i] <= 19
                                  for i in recs.indices)
    # hidden items are never served, offline scores included
    knob.reranker.hide(["i03"])
    assert all(3 not in knob.recommend_for(hist, acts, 11).indices for hist, acts in zip(h, a))
    assert (knob.score(h, a)[:, 3] == -np.inf).all()


def test_diversity_knob_on_a_beauty_slice_spreads_the_list_and_keeps_the_top_item():
    catalog, events = beauty_first_users_events(1500)
    split = leave_one_out(events)
    cfg = PipelineConfig.union({"cooccurrence": 100, "popularity": 50}, model="cooccurrence", scorer="model",
                               rest="cooccurrence", dense=NO_CACHE, rerank=RerankConfig())
    pipe = Pipeline(cfg, embedder=HashEmbedder()).fit(split.train, catalog)
    vectors = pipe.reranker.vectors
    cases = list(zip(split.test.histories[:120], split.test.actions[:120]))
    lists = {d: [pipe.recommend_for(h, a, 10, {"diversity": d}) for h, a in cases] for d in (0.0, 0.3, 0.7)}
    emb = {d: intra_list_diversity([r.indices for r in ls], embeddings=vectors) for d, ls in lists.items()}
    cat = {d: intra_list_diversity([r.indices for r in ls], categories=catalog.categories) for d, ls in lists.items()}
    assert emb[0.0] < emb[0.3] < emb[0.7], emb
    assert cat[0.0] < cat[0.7], cat
    warm = [b for b, r in enumerate(lists[0.0]) if not r.cold]
    assert len(warm) > 100
    for d in (0.3, 0.7):
        assert all(lists[d][b].items[0] == lists[0.0][b].items[0] for b in warm)  # the most relevant stays first
        assert all(len(lists[d][b]) == 10 for b in warm)


def test_products_the_scorer_cannot_rank_get_the_new_product_places():
    """Items 8.. were added after the model was fitted (`n_scored` 8): the first two of them in the list move to
    positions 2 and 6 (`new_item_first`, `new_item_every`), the rest keep their order; off without `n_scored`,
    with 0 slots, or when the list has none; a short list takes them at its end."""
    cat = catalog_of(["A"] * 12)
    r = DiversityReranker(RerankConfig(new_item_slots=2)).fit(cat)
    order = [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 10]
    assert rerank(r, order) == order  # n_scored unset: every product is rankable
    r.n_scored = 8
    assert rerank(r, order) == [0, 1, 9, 2, 3, 4, 11, 5, 6, 7, 10]
    assert rerank(r, order, banned=[9]) == [0, 1, 11, 2, 3, 4, 10, 5, 6, 7]  # banned first, then the places
    assert rerank(r, [0, 1, 2, 3, 4, 5]) == [0, 1, 2, 3, 4, 5]
    assert rerank(r, [10, 0]) == [0, 10]  # fewer items than the first place: appended
    off = DiversityReranker(RerankConfig(new_item_slots=0)).fit(cat)
    off.n_scored = 8
    assert rerank(off, order) == order
