"""The user simulator on a slice of real Amazon Beauty users: deterministic, position-biased, grounded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from dragonrec.data.readers import load_dataset
from dragonrec.data.splits import leave_one_out
from dragonrec.evaluate.simulator import (
    Lists,
    RecommenderPolicy,
    Simulator,
    SimulatorConfig,
    examination,
    fit_browse_funnel,
    split_users,
    summarize_seeds,
    users_from_split,
)
from dragonrec.recommenders import build

DATA = SHARED_DATA


@pytest.fixture(scope="module")
def beauty():
    ds = load_dataset(DATA / "amazon-beauty")
    keep = ds.events["user_id"].drop_duplicates().iloc[:3000]
    events = ds.events[ds.events["user_id"].isin(keep)].reset_index(drop=True)
    split = leave_one_out(events)
    return ds.catalog, split


@pytest.fixture(scope="module")
def sim(beauty):
    catalog, split = beauty
    return Simulator(catalog, split.train)


def _random_policy(n_items: int, seed: int):
    rng = np.random.default_rng(seed)

    def policy(histories, actions, n):
        return Lists(np.stack([rng.choice(n_items, n, replace=False) for _ in histories]), version="random")
    return policy


def _oracle_policy(users, n_items: int, seed: int = 0):
    """Puts each user's real future item first (looked up by history length + first items)."""
    rng = np.random.default_rng(seed)
    by_history = {tuple(u.history.tolist()): int(u.future[0]) for u in users}

    def policy(histories, actions, n):
        out = []
        for h in histories:
            first = by_history.get(tuple(h.tolist()))
            fill = rng.choice(n_items, n, replace=False)
            out.append(np.concatenate([[first], fill[fill != first][: n - 1]]) if first is not None else fill)
        return Lists(np.stack(out).astype(np.int64), version="oracle")
    return policy


def test_users_from_split_cut_where_models_saw_nothing(beauty):
    _, split = beauty
    users = users_from_split(split, start="test")
    assert len(users) == len(split.test)
    u, i = users[5], 5
    assert np.array_equal(u.history, split.test.histories[i])
    assert u.future.tolist() == [split.test.targets[i]]
    v = users_from_split(split, start="valid")[i]
    assert np.array_equal(v.history, split.valid.histories[i])
    assert v.future.tolist() == [split.valid.targets[i], split.test.targets[i]]
    # the training events of this user end before the validation target
    assert len(split.train[split.train["user_id"] == u.user_id]) == len(v.history)


def test_feedback_and_evaluation_users_are_disjoint(beauty):
    _, split = beauty
    users = users_from_split(split)
    fb, ev = split_users(users, 0.4, seed=3)
    ids_fb, ids_ev = {u.user_id for u in fb}, {u.user_id for u in ev}
    assert not ids_fb & ids_ev
    assert len(ids_fb) + len(ids_ev) == len(users)
    assert abs(len(fb) - 0.4 * len(users)) <= 1
    with pytest.raises(ValueError, match="feedback_share"):
        split_users(users, 1.0)


def test_deterministic_for_a_seed(beauty, sim):
    catalog, split = beauty
    users = users_from_split(split)[:300]
    pop = RecommenderPolicy(build("popularity").fit(split.train, catalog))
    a, b = sim.run(pop, users, seed=7), sim.run(pop, users, seed=7)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert [i.item_ids for i in a.impressions] == [i.item_ids for i in b.impressions]
    c = sim.run(pop, users, seed=8)
    assert not a.events[["user_id", "item_id", "action"]].equals(c.events[["user_id", "item_id", "action"]])
    # batching does not change a run: every user draws from their own seeded generator
    d = sim.run(pop, users, seed=7, batch_size=37)
    pd.testing.assert_frame_equal(a.events.sort_values("event_id").reset_index(drop=True),
                                  d.events.sort_values("event_id").reset_index(drop=True))


def test_click_through_falls_with_position(beauty, sim):
    catalog, split = beauty
    users = users_from_split(split)
    # A random order takes relevance out: what is left is examination.
    log = sim.run(_random_policy(len(catalog), 0), users, seed=1)
    by_pos = log.summary()["ctr_by_position"]
    top, bottom = by_pos[1] + by_pos[2], by_pos[9] + by_pos[10]
    assert top > 1.5 * bottom, by_pos
    interacted = log.events.groupby("request_id").size()
    assert len(interacted) > 0
    # with every slot examined, the bias is gone (within noise)
    flat = Simulator(catalog, split.train, SimulatorConfig(examination="all")).run(
        _random_policy(len(catalog), 0), users, seed=1).summary()["ctr_by_position"]
    assert flat[1] + flat[2] < 1.5 * (flat[9] + flat[10]) + 0.01, flat
    assert np.allclose(examination(3), [1.0, 1 / np.log2(3), 0.5])


def test_real_future_items_earn_the_reward(beauty, sim):
    catalog, split = beauty
    users = users_from_split(split)[:1000]
    oracle = sim.run(_oracle_policy(users, len(catalog)), users, seed=2).summary()
    rand = sim.run(_random_policy(len(catalog), 2), users, seed=2).summary()
    cooc = sim.run(RecommenderPolicy(build("cooccurrence").fit(split.train, catalog)), users, seed=2).summary()
    # the oracle's first slot is always examined and its item clicked with p_click_future (0.8)
    assert 0.7 < oracle["users_finding_future"] < 0.9
    assert oracle["reward_per_impression"] > cooc["reward_per_impression"] > rand["reward_per_impression"]
    assert rand["users_finding_future"] < 0.01
    assert oracle["purchases_per_impression"] > rand["purchases_per_impression"]


def test_every_event_answers_a_shown_slot(beauty, sim):
    catalog, split = beauty
    users = users_from_split(split)[:200]
    log = sim.run(RecommenderPolicy(build("popularity").fit(split.train, catalog)), users, seed=0)
    slots = log.rewarded()
    assert slots[[c for c in slots.columns if c.startswith("n_")]].to_numpy().sum() == len(log.events)
    assert slots.attrs["unattributed_events"] == 0
    shown = {(i.request_id, x) for i in log.impressions for x in i.item_ids}
    assert set(zip(log.events["request_id"], log.events["item_id"])) <= shown
    sessions = pd.Series([i.user_id for i in log.impressions]).value_counts()
    assert sessions.max() <= SimulatorConfig().max_requests and sessions.min() >= 1
    assert sessions.max() > 1  # sessions go on over several requests
    # what a user did enters their history: the second list never repeats an item they answered in the first
    answered = log.events.groupby("request_id")["item_id"].agg(set)
    second = [i for i in log.impressions if i.request_id.endswith("-2")]
    assert second
    for imp in second:
        before = answered.get(imp.request_id[:-2] + "-1", set())
        assert before and not set(imp.item_ids) & before


def test_a_policy_of_the_wrong_shape_is_refused(beauty, sim):
    _, split = beauty
    users = users_from_split(split)[:10]
    with pytest.raises(ValueError, match="shape"):
        sim.run(lambda h, a, n: Lists(np.zeros((len(h), n - 1), np.int64)), users)


def test_browse_funnel_defaults_are_the_rees46_fit():
    events = pd.read_parquet(DATA / "rees46-multicat-head" / "interactions.parquet")
    fit = fit_browse_funnel(events)
    cfg = SimulatorConfig()
    assert fit["p_cart_after_click"] == pytest.approx(cfg.p_cart_after_click, abs=5e-5)
    assert fit["p_purchase_after_cart"] == pytest.approx(cfg.p_purchase_after_cart, abs=5e-5)
    assert fit["p_continue"] == pytest.approx(cfg.p_continue, abs=5e-5)
    with pytest.raises(ValueError, match="missing"):
        fit_browse_funnel(events.drop(columns=["action"]))


def test_summarize_seeds():
    s = summarize_seeds([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx(4.303 / np.sqrt(3), rel=1e-3)


def test_expected_rewards_match_the_simulated_average(beauty):
    """The closed-form expected slot reward agrees with the mean of simulated first requests."""
    catalog, split = beauty
    users = users_from_split(split)[:400]
    one = Simulator(catalog, split.train, SimulatorConfig(max_requests=1))
    policy = _oracle_policy(users, len(catalog), seed=4)
    lists = policy([u.history for u in users], [u.actions for u in users], 10).items
    expected = one.expected_rewards(users, lists).sum(axis=1).mean()

    def fixed(histories, actions, n):  # one request per user, all in one batch: the lists above, in order
        assert len(histories) == len(users)
        return Lists(lists)

    simulated = [one.run(fixed, users, seed=s).rewarded()["reward"].sum() / len(users) for s in range(8)]
    assert abs(np.mean(simulated) - expected) < 0.05 * abs(expected) + 0.02, (np.mean(simulated), expected)
    with pytest.raises(ValueError, match="lists must be"):
        one.expected_rewards(users, lists[:5])
