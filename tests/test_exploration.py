"""Exploration in the service: a Thompson-sampling bandit over rarely shown candidates fills at most k slots
of at most a share of the lists, logs each slot's exact probability, and shows rarely shown items more than
greedy serving; the diversity knob through the API (0 = relevance order, unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import API_KEY, beauty_slice

from dragonrec.evaluate.metrics import intra_list_diversity
from dragonrec.pipeline import Recommended
from dragonrec.serve import Settings, create_app
from dragonrec.serve.serving import ItemExposure, bandit_explore, thompson_rank_probabilities


def exposure_of(shown: dict[str, int], clicks: dict[str, int] | None = None) -> ItemExposure:
    e = ItemExposure()
    e.shown, e.clicks = dict(shown), dict(clicks or {})
    return e


def ranked_list(m: int) -> list:
    return [Recommended(f"i{k}", k, float(m - k), "model", "predicted") for k in range(m)]


def test_thompson_rank_probabilities_match_monte_carlo():
    a = np.asarray([1.0, 3.0, 1.0, 6.0, 2.0])
    b = np.asarray([1.0, 20.0, 5.0, 40.0, 2.0])
    probs, err = thompson_rank_probabilities(a, b, 2)
    assert probs.shape == (5, 2) and err < 1e-3  # the quadrature is close to exact before normalising
    assert probs.sum(axis=0) == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(0)
    draws = rng.beta(a, b, size=(200_000, 5))
    order = np.argsort(-draws, axis=1)
    for j in range(2):
        freq = np.bincount(order[:, j], minlength=5) / len(draws)
        assert freq == pytest.approx(probs[:, j], abs=0.004)  # 200k draws: sd <= 0.0011
    # equal posteriors: every rank equally likely
    same, _ = thompson_rank_probabilities(np.ones(4), np.ones(4), 3)
    assert same == pytest.approx(np.full((4, 3), 0.25), abs=1e-3)


def test_explored_slots_are_bounded_and_logged_with_their_real_frequency():
    ranked, greedy = ranked_list(30), ranked_list(30)[:8]
    # candidates i8.. i29 within the pool of 20; i9 shown too often: not explorable; some have clicks
    exposure = exposure_of({"i9": 500, "i10": 30, "i11": 30, "i12": 4}, {"i10": 6, "i11": 1})
    rng = np.random.default_rng(1)
    trials, share, slots = 10_000, 0.3, 2
    counts: dict[tuple[int, str], int] = {}
    logged: dict[tuple[int, str], float] = {}
    explored_lists = 0
    for _ in range(trials):
        shown, props, k = bandit_explore(greedy, ranked, exposure, slots, share, 20, 50, rng)
        assert len(shown) == 8 and len(props) == 8 and k in (0, 2)
        assert [r.item_id for r in shown[:6]] == [r.item_id for r in greedy[:6]] and props[:6] == [1.0] * 6
        explored_lists += k > 0
        assert sum(r.source == "explore" for r in shown) == k  # never more than `slots`
        for pos, (r, p) in enumerate(zip(shown, props)):
            counts[(pos, r.item_id)] = counts.get((pos, r.item_id), 0) + 1
            assert logged.setdefault((pos, r.item_id), p) == pytest.approx(p)  # one probability per (slot, item)
            assert 0 < p <= 1
    assert explored_lists / trials == pytest.approx(share, abs=0.025)  # the share holds (sd 0.0046)
    tail_items = {item for (pos, item) in counts if pos >= 6}
    assert not tail_items & {"i9", "i20", "i25"}  # shown too often, or outside the pool of 20
    for key, p in logged.items():  # every slot's logged probability is its empirical frequency
        sd = np.sqrt(p * (1 - p) / trials)
        assert counts[key] / trials == pytest.approx(p, abs=5 * sd + 1e-4), key
    assert sum(logged[k] for k in logged if k[0] == 7) == pytest.approx(1.0, abs=1e-6)  # slot 7 sums to one
    # a never shown candidate (Beta(1, 1)) is explored more than one shown 30 times (Beta(7, 25))
    assert counts[(6, "i8")] > counts.get((6, "i10"), 0)


def test_with_exploration_off_nothing_changes():
    ranked, greedy = ranked_list(30), ranked_list(30)[:8]
    exposure = exposure_of({})
    for slots, share in ((0, 0.5), (2, 0.0)):
        assert bandit_explore(greedy, ranked, exposure, slots, share, 20, 50) == (greedy, [1.0] * 8, 0)
    # nothing rarely shown left: deterministic too
    everything = exposure_of({r.item_id: 1000 for r in ranked})
    assert bandit_explore(greedy, ranked, everything, 2, 0.5, 20, 50) == (greedy, [1.0] * 8, 0)


def test_rarely_shown_items_get_shown_more_than_under_greedy():
    ranked, greedy = ranked_list(40), ranked_list(40)[:10]
    rng = np.random.default_rng(2)

    def serve(slots: int) -> dict[str, int]:
        exposure = exposure_of({})
        for _ in range(3000):
            shown, _, _ = bandit_explore(greedy, ranked, exposure, slots, 0.2, 40, 30, rng)
            for r in shown:
                exposure.shown[r.item_id] = exposure.shown.get(r.item_id, 0) + 1
        return exposure.shown

    greedy_counts, bandit_counts = serve(0), serve(2)
    tail = [r.item_id for r in ranked[10:]]
    assert sum(greedy_counts.get(i, 0) for i in tail) == 0
    assert sum(bandit_counts.get(i, 0) > 0 for i in tail) == 30  # every candidate got its chance
    # and exploration stops at the rarity bound: no tail item far above it (30 + what one refresh adds)
    assert max(bandit_counts[i] for i in tail) <= 31


# -- through the service ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore-shop")
    data = beauty_slice(root / "data", n_items=300, max_users=600)
    settings = Settings(data_dir=data, state_dir=root / "state", api_keys=[API_KEY], diversity=0.3,
                        explore_slots=2, explore_share=0.5, explore_pool=30, explore_max_shown=1000)
    with TestClient(create_app(settings)) as client:
        yield client, client.app.state.service


def test_both_exploration_policies_at_once_are_refused(tmp_path):
    with pytest.raises(ValueError, match="set one of them"):
        create_app(Settings(data_dir=tmp_path, state_dir=tmp_path / "s", explore_epsilon=0.1, explore_slots=2))


def test_the_service_explores_a_bounded_share_and_stores_each_slots_probability(shop):
    client, service = shop
    users = list(service.events["user_id"].unique()[:80])
    explored = 0
    for u in users:
        body = client.post("/v1/recommend", json={"user_id": u, "n": 6}).json()
        imp = service.store.impression(body["request_id"])
        props, sources = imp.propensities, [x["source"] for x in body["items"]]
        assert props[:4] == [1.0] * 4 and all(0 < p <= 1 for p in props)
        k = sum(s == "explore" for s in sources)
        assert k in (0, 2)
        if k:
            assert sources[4:] == ["explore", "explore"]
            explored += 1
            assert all(p < 0.5 for p in props[4:])  # share 0.5 times the item's draw probability
        else:
            assert props[4:] == [0.5, 0.5]  # the greedy item, shown because the coin said not to explore
    assert 0.25 < explored / len(users) < 0.75  # share 0.5 of 80 requests (sd 0.056)
    service.exposure.refresh(service.store)
    assert sum(service.exposure.shown.values()) >= 6 * len(users)


def test_diversity_zero_is_pure_relevance_through_the_api(shop):
    client, service = shop
    service.settings = service.settings.model_copy(update={"explore_slots": 0})  # deterministic lists here
    try:
        user = str(service.events.groupby("user_id").size().idxmax())
        plain = [x["item_id"] for x in client.post("/v1/recommend", json={"user_id": user, "n": 10,
                                                                          "diversity": 0.0}).json()["items"]]
        default = [x["item_id"] for x in client.post("/v1/recommend", json={"user_id": user, "n": 10}).json()["items"]]
        # pure relevance: the pipeline's own order, its scores non-increasing down the list
        history, actions, _ = service._history_for(user, service.catalog, 0.0)
        assert plain == service.serving.pipeline.recommend_for(history, actions, 10, {"diversity": 0.0}).items
        scores = [x["score"] for x in client.post("/v1/recommend", json={"user_id": user, "n": 10,
                                                                         "diversity": 0.0}).json()["items"]]
        assert scores == sorted(scores, reverse=True)
        assert default != plain  # the settings' knob (0.3) re-ranks
        vectors = service.serving.pipeline.reranker.vectors
        cat = service.catalog
        assert intra_list_diversity([cat.indices(default)], embeddings=vectors) > \
            intra_list_diversity([cat.indices(plain)], embeddings=vectors)
    finally:
        service.settings = service.settings.model_copy(update={"explore_slots": 2})


def test_the_relevance_setting_reaches_the_re_ranker(shop):
    _, service = shop
    assert service.rerank_config().relevance == "minmax"
    old = service.settings
    service.settings = old.model_copy(update={"diversity_relevance": "probability", "diversity_mode": "dpp"})
    try:
        cfg = service.rerank_config()
        assert (cfg.relevance, cfg.mode) == ("probability", "dpp")
    finally:
        service.settings = old


def test_request_filters_and_exclusions_hold_and_contradictions_are_4xx(shop):
    client, service = shop
    user = str(service.events["user_id"].iloc[0])
    first = client.post("/v1/recommend", json={"user_id": user, "n": 10}).json()["items"]
    banned = [x["item_id"] for x in first[:3]]
    body = client.post("/v1/recommend", json={"user_id": user, "n": 10, "diversity": 0.5, "filters": {
        "max_price": 25, "exclude": banned}}).json()
    assert len(body["items"]) == 10
    for x in body["items"]:
        item = service.item(x["item_id"])
        assert x["item_id"] not in banned and item["price"] is not None and item["price"] <= 25
    bad = client.post("/v1/recommend", json={"user_id": user, "filters": {"min_price": 30, "max_price": 10}})
    assert bad.status_code == 422 and "min_price 30.0 is above max_price 10.0" in bad.text
