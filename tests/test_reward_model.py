"""The learned reward model: examples and labels on hand-made logs (no leakage), metrics on hand-computed cases,
baselines, learning a planted signal better than the popularity prior, save/load, seeds, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset

from dragonrec.data import Catalog, load_dataset
from dragonrec.embed import HashEmbedder
from dragonrec.reward_model import (
    EXAMPLE_COLUMNS,
    ExampleConfig,
    PlattCalibrator,
    PopularityPrior,
    RewardModel,
    RewardModelConfig,
    auc,
    content_similarity_scores,
    examples_from_events,
    examples_from_impressions,
    history_reward_scores,
    log_loss,
    split_event_log,
    split_examples,
)
from dragonrec.rewards import RewardConfig
from dragonrec.schema import Impression

# Small and quick: a few hundred steps at most on a few thousand rows.
TINY = {"dim": 16, "hidden": 32, "max_epochs": 8, "eval_every": 20, "patience": 4, "batch_size": 128}


def events(*rows) -> pd.DataFrame:
    """(user, item, action, timestamp[, request_id]) tuples as a canonical events table."""
    full = [tuple(r) + (None,) * (5 - len(r)) for r in rows]
    df = pd.DataFrame(full, columns=["user_id", "item_id", "action", "timestamp", "request_id"])
    return df.assign(event_id=[f"e{k}" for k in range(len(df))], value=np.nan)


def row(table: pd.DataFrame, item: str, ts: float) -> pd.Series:
    hit = table[(table["item_id"] == item) & (table["timestamp"] == ts)]
    assert len(hit) == 1
    return hit.iloc[0]


# ---------------------------------------------------------------- examples from a typed log


def test_a_view_is_labelled_by_a_later_cart_or_purchase_within_the_window_and_sees_only_its_past():
    ev = events(("u", "a", "view", 0), ("u", "b", "view", 10), ("u", "a", "add_to_cart", 50),
                ("u", "a", "purchase", 60), ("u", "a", "view", 100), ("u", "d", "view", 300),
                ("u", "d", "add_to_cart", 300), ("u", "e", "view", 400), ("u", "e", "purchase", 1401),
                ("w", "a", "view", 5))
    ex = examples_from_events(ev, cfg=ExampleConfig(window_s=1000))
    assert list(ex.columns) == list(EXAMPLE_COLUMNS) and len(ex) == 6  # one row per view
    first = row(ex, "a", 0)
    assert first["label"] == 1 and first["reward"] == 1.0 and first["history"] == []
    assert row(ex, "b", 10)["label"] == 0 and row(ex, "b", 10)["reward"] == pytest.approx(0.2)
    again = row(ex, "a", 100)  # the cart and purchase came before it: they are its history, not its label
    assert again["label"] == 0
    assert again["history"] == ["a", "b", "a", "a"]
    assert again["history_actions"] == ["view", "view", "add_to_cart", "purchase"]
    same_second = row(ex, "d", 300)  # a cart in the view's own second is its outcome, never its context
    assert same_second["label"] == 1 and "add_to_cart" not in same_second["history_actions"][-1:]
    assert row(ex, "e", 400)["label"] == 0  # the purchase came 1001 s later: outside the window
    assert row(ex, "a", 5)["label"] == 0 and row(ex, "a", 5)["history"] == []  # another user's cart is not w's
    # The window defaults to the reward config's; the outcome set is configurable.
    assert row(examples_from_events(ev, RewardConfig(window_s=2000)), "e", 400)["label"] == 1
    only_buys = examples_from_events(ev, cfg=ExampleConfig(window_s=1000, outcome_actions=("purchase",)))
    assert row(only_buys, "d", 300)["label"] == 0 and row(only_buys, "a", 0)["label"] == 1


def test_a_time_split_censors_training_labels_at_its_cut_and_never_shows_a_test_event_to_training():
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):  # views every 10 s; a third of them carted 30 s later
        for k in range(10):
            t = 10.0 * (u % 7) + 100.0 * k
            rows.append((f"u{u}", f"i{(u + k) % 15}", "view", t))
            if rng.random() < 0.33:
                rows.append((f"u{u}", f"i{(u + k) % 15}", "add_to_cart", t + 30))
    ev = events(*rows)
    split = split_event_log(ev, by="time", valid_frac=0.2, test_frac=0.2, reward_cfg=RewardConfig(window_s=500))
    cut_valid, cut_test = split.cuts
    assert split.train["timestamp"].max() < cut_valid <= split.valid["timestamp"].min()
    assert split.valid["timestamp"].max() < cut_test <= split.test["timestamp"].min()
    # Training rows are exactly what the log before the cut says: no later cart labels them, no later event
    # is their history.
    before = ev[ev["timestamp"] < cut_valid]
    pd.testing.assert_frame_equal(split.train, examples_from_events(before, RewardConfig(window_s=500)))
    full = examples_from_events(ev, RewardConfig(window_s=500))
    censored = full[(full["timestamp"] < cut_valid) & (full["timestamp"] + 30 >= cut_valid)]
    assert censored["label"].sum() > 0  # the full log labels some of these views positive...
    keys = ["user_id", "item_id", "timestamp"]
    merged = censored.merge(split.train, on=keys, suffixes=("_full", "_train"))
    assert len(merged) == len(censored) and merged["label_train"].sum() == 0  # ...training never sees it
    # Test rows keep their full labels (the log's end is the only censoring there).
    test_full = full[full["timestamp"] >= cut_test].reset_index(drop=True)
    assert split.test["label"].tolist() == test_full["label"].tolist()


def test_a_user_split_puts_every_user_in_one_part_and_depends_on_the_seed():
    ev = events(*[(f"u{u}", f"i{k}", "view", float(k)) for u in range(50) for k in range(4)])
    a = split_event_log(ev, by="user", valid_frac=0.2, test_frac=0.2, seed=1)
    parts = [set(p["user_id"]) for p in (a.train, a.valid, a.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == 50 and len(parts[2]) == 10
    b = split_event_log(ev, by="user", valid_frac=0.2, test_frac=0.2, seed=2)
    assert set(b.test["user_id"]) != parts[2]
    again = split_event_log(ev, by="user", valid_frac=0.2, test_frac=0.2, seed=1)
    assert set(again.test["user_id"]) == parts[2]
    with pytest.raises(ValueError, match="fractions"):
        split_examples(a.train, "user", valid_frac=0.5, test_frac=0.5)
    with pytest.raises(ValueError, match="'user' or 'time'"):
        split_examples(a.train, "item")


# ---------------------------------------------------------------- examples from impressions


def test_impression_slots_become_examples_with_reward_label_position_and_the_history_before_them():
    imps = [Impression(request_id="r1", user_id="u", item_ids=["a", "b", "c"], timestamp=100.0),
            Impression(request_id="r2", user_id="u", item_ids=["d", "a"], timestamp=200.0)]
    ev = events(("u", "x", "view", 10), ("u", "a", "click", 110, "r1"), ("u", "a", "purchase", 130),
                ("u", "b", "scroll_past", 105, "r1"), ("u", "d", "hover", 210, "r2"))
    ex = examples_from_impressions(imps, ev)
    assert list(ex.columns[:len(EXAMPLE_COLUMNS)]) == list(EXAMPLE_COLUMNS) and len(ex) == 5
    r1 = ex[ex["request_id"] == "r1"].set_index("item_id")
    assert r1["position"].tolist() == [0, 1, 2]
    assert r1["reward"].tolist() == pytest.approx([1.0, -0.2, 0.0])
    assert r1["label"].tolist() == [1, 0, 0]
    assert all(h == ["x"] for h in r1["history"])  # the answers to r1 came after it
    r2 = ex[ex["request_id"] == "r2"].set_index("item_id")
    assert r2.loc["d", "label"] == 0  # a hover is neutral: not a positive outcome
    # Positive history only by default (no scroll-past), every event with history_actions="all".
    assert r2.loc["d", "history"] == ["x", "a", "a"]
    assert r2.loc["d", "history_actions"] == ["view", "click", "purchase"]
    every = examples_from_impressions(imps, ev, cfg=ExampleConfig(history_actions="all"))
    assert every.set_index(["request_id", "item_id"]).loc[("r2", "d"), "history_actions"] == [
        "view", "scroll_past", "click", "purchase"]
    # Label by outcome: only the purchase counts.
    by_buy = examples_from_impressions(imps, ev, cfg=ExampleConfig(impression_label="outcome",
                                                                   outcome_actions=("purchase",)))
    assert by_buy["label"].sum() == 1


# ---------------------------------------------------------------- metrics and baselines


def test_auc_and_log_loss_on_hand_computed_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert log_loss([1, 0], [0.8, 0.2]) == pytest.approx(-np.log(0.8))
    assert log_loss([1], [0.0]) == pytest.approx(-np.log(1e-7))  # clipped, not infinite
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="2 labels but 3"):
        log_loss([0, 1], [0.1, 0.2, 0.3])


def _examples(*rows) -> pd.DataFrame:
    """(user, item, label, history, history_actions) rows as an example table."""
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "history", "history_actions"])
    return df.assign(timestamp=np.arange(len(df), dtype=float), position=-1, reward=df["label"] * 1.0)


def _abc_catalog() -> Catalog:
    return Catalog(pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["red shoe", "red boot", "blue hat",
                                 "green scarf"], "category": ["shoes", "shoes", "hats", None]}))


def test_popularity_prior_is_the_smoothed_positive_rate_and_unseen_items_get_the_base_rate():
    train = _examples(*[("u", "a", y, [], []) for y in (1, 1, 0, 0)], *[("u", "b", y, [], []) for y in (1, 0, 0)],
                      *[("u", "c", 0, [], [])] * 3)
    prior = PopularityPrior(strength=2.0).fit(train)
    test = _examples(("v", "a", 0, [], []), ("v", "d", 0, [], []))
    assert prior.predict(test) == pytest.approx([(2 + 2 * 0.3) / (4 + 2), 0.3])
    counted = PopularityPrior(kind="count").fit(train)
    p = counted.predict(_examples(("v", "a", 0, [], []), ("v", "c", 0, [], []), ("v", "d", 0, [], [])))
    assert p[0] > p[1] > p[2]  # shown 4 times > 3 times > never; the labels only set the calibration


def test_the_history_heuristic_scores_what_the_user_did_to_the_item_and_its_category():
    cat = _abc_catalog()
    ex = _examples(("u", "a", 1, ["a", "c"], ["purchase", "view"]), ("u", "b", 0, ["a", "c"], ["purchase", "view"]),
                   ("u", "c", 0, ["a", "c"], ["purchase", "view"]), ("u", "d", 0, ["a", "c"], ["purchase", "view"]),
                   ("v", "a", 0, [], []))
    assert history_reward_scores(ex, cat) == pytest.approx([1.0, 0.5, 0.2, 0.0, 0.0])
    vecs = HashEmbedder(32).encode(["red shoe", "red boot", "blue hat", "green scarf"])
    sim = content_similarity_scores(ex, cat, vecs)
    assert sim[0] == pytest.approx(1.0) and sim[1] > sim[3] and sim[4] == 0.0
    cal = PlattCalibrator().fit([0, 0, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0, 0, 1])
    p = cal.predict([0.0, 1.0])
    assert p[0] < p[1] and 0 < p[0] < 1
    assert cal.predict([0, 0, 0, 1, 1, 0, 1, 1]).mean() == pytest.approx(0.5, abs=1e-3)  # calibrated


# ---------------------------------------------------------------- learning


def planted(n_users: int = 240, seed: int = 0) -> tuple[pd.DataFrame, Catalog]:
    """Users like one of four colours; they viewed three items of it before; a shown item is a positive
    outcome when it has their colour (10 % of labels flipped). Every item is shown equally often, so the
    popularity prior has nothing to go on."""
    rng = np.random.default_rng(seed)
    colours = ["red", "blue", "green", "black"]
    items = pd.DataFrame({"item_id": [f"i{k:02d}" for k in range(40)],
                          "title": [f"{colours[k % 4]} product {k}" for k in range(40)],
                          "category": [f"c{k % 8}" for k in range(40)]})
    rows = []
    for u in range(n_users):
        fav = u % 4
        mine = [k for k in range(40) if k % 4 == fav]
        hist = [f"i{k:02d}" for k in rng.choice(mine, size=3, replace=False)]
        for k in rng.permutation(40)[:8]:
            label = int(k % 4 == fav) ^ int(rng.random() < 0.1)
            rows.append((f"u{u:03d}", f"i{k:02d}", label, hist, ["view"] * 3))
    return _examples(*rows), Catalog(items)


def test_the_model_learns_a_planted_history_signal_the_popularity_prior_cannot_see():
    ex, cat = planted()
    split = split_examples(ex, "user", valid_frac=0.15, test_frac=0.25, seed=0)
    model = RewardModel(RewardModelConfig(**TINY), embedder=HashEmbedder(32)).fit(split.train, cat, split.valid)
    y = split.test["label"]
    p = model.predict(split.test)
    prior = PopularityPrior().fit(split.train).predict(split.test)
    assert auc(y, p) > 0.8 > auc(y, prior) + 0.2
    assert log_loss(y, p) < log_loss(y, prior) - 0.1
    assert model.info["best_valid_log_loss"] < model.info["evals"][0]["valid_log_loss"]  # it learned
    assert ((0 < p) & (p < 1)).all() and model.predict_reward(split.test).shape == (len(y),)


def test_on_a_real_rees46_slice_it_learns_a_planted_same_brand_signal_better_than_popularity():
    """Real users, items, histories and views (REES46); the label is planted: the viewed item's brand is a
    brand the user viewed before. Only item text (brand) and history carry it."""
    ds = load_dataset(shared_dataset("rees46-multicat-head"))
    users = ds.events.groupby("user_id").size()
    ev = ds.events[ds.events["user_id"].isin(users[users >= 4].index[:500])]
    ex = examples_from_events(ev, cfg=ExampleConfig(history_len=20))
    brand = dict(zip(ds.catalog.items["item_id"], ds.catalog.items["brand"].fillna("")))
    ex = ex[[len(h) > 0 for h in ex["history"]]].reset_index(drop=True)
    ex["label"] = [int(brand[i] != "" and brand[i] in {brand[x] for x in h})
                   for i, h in zip(ex["item_id"], ex["history"])]
    assert 0.2 < ex["label"].mean() < 0.8
    split = split_examples(ex, "user", valid_frac=0.15, test_frac=0.3, seed=0)
    cfg = RewardModelConfig(**TINY, category_column="category_id", reward_loss_weight=0.0)
    model = RewardModel(cfg, embedder=HashEmbedder(64)).fit(split.train, ds.catalog, split.valid)
    y = split.test["label"]
    prior = PopularityPrior().fit(split.train).predict(split.test)
    assert auc(y, model.predict(split.test)) > auc(y, prior) + 0.1


def test_save_and_load_give_identical_predictions_and_a_seed_gives_identical_models(tmp_path):
    ex, cat = planted(n_users=80)
    split = split_examples(ex, "user", valid_frac=0.2, test_frac=0.2, seed=0)
    cfg = RewardModelConfig(**(TINY | {"max_epochs": 2}), seed=3)
    a = RewardModel(cfg, embedder=HashEmbedder(32)).fit(split.train, cat, split.valid)
    b = RewardModel(cfg, embedder=HashEmbedder(32)).fit(split.train, cat, split.valid)
    p = a.predict(split.test)
    assert np.array_equal(p, b.predict(split.test))
    other = RewardModel(cfg.model_copy(update={"seed": 4}), embedder=HashEmbedder(32))
    assert not np.array_equal(p, other.fit(split.train, cat, split.valid).predict(split.test))
    a.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm", cat, embedder=HashEmbedder(32))
    assert np.array_equal(p, loaded.predict(split.test))
    assert np.array_equal(a.predict_reward(split.test), loaded.predict_reward(split.test))
    assert loaded.cfg == cfg
    with pytest.raises(ValueError, match="trained with embedder 'hash-32'"):
        RewardModel.load(tmp_path / "rm", cat, embedder=HashEmbedder(16))
    with pytest.raises(FileNotFoundError, match="not a saved RewardModel"):
        RewardModel.load(tmp_path, cat)


def test_a_training_rows_own_label_never_feeds_its_own_popularity_features():
    """The item and category positive-rate features of training rows are counted out of fold (other users):
    flipping one row's label changes the other folds' features, never its own. (Private helpers: the property
    is about what training sees, which no public output shows.)"""
    from dragonrec.reward_model import _history_arrays

    ex, cat = planted(n_users=60)
    model = RewardModel(RewardModelConfig(**(TINY | {"max_epochs": 1})), embedder=HashEmbedder(16)).fit(ex, cat)
    h = _history_arrays(ex, cat, model.cfg.max_history)
    flipped = ex.copy()
    flipped.loc[0, "label"] = 1 - flipped.loc[0, "label"]
    before, after = model._oof_dense(ex, h), model._oof_dense(flipped, h)
    assert np.array_equal(before[0], after[0])
    same_item = (ex["item_id"] == ex.loc[0, "item_id"]).to_numpy() & (ex["user_id"] != ex.loc[0, "user_id"]).to_numpy()
    assert not np.array_equal(before[same_item], after[same_item])  # the flip is seen by other users' rows


# ---------------------------------------------------------------- bad input


def test_bad_input_fails_with_the_reason():
    ex, cat = planted(n_users=40)
    model = RewardModel(RewardModelConfig(**(TINY | {"max_epochs": 1})), embedder=HashEmbedder(16))
    with pytest.raises(RuntimeError, match="fit or load"):
        model.predict(ex)
    with pytest.raises(ValueError, match="miss column.*label"):
        model.fit(ex.drop(columns="label"), cat)
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        model.fit(ex.assign(label=ex["label"] * 2), cat)
    with pytest.raises(ValueError, match="all the same"):
        model.fit(ex.assign(label=0), cat)
    bad_item = ex.copy()
    bad_item.loc[5, "item_id"] = "nope"
    with pytest.raises(ValueError, match=r"unknown item 'nope' in item_id \(example row 5\)"):
        model.fit(bad_item, cat)
    model.fit(ex, cat)
    with pytest.raises(ValueError, match="miss column.*history"):
        model.predict(ex.drop(columns="history"))
    bad_hist = ex.copy()
    bad_hist.at[7, "history"] = ["i01", "ghost", "i02"]
    with pytest.raises(ValueError, match=r"unknown item 'ghost' in history \(example row 7\)"):
        model.predict(bad_hist)
    bad_hist.at[7, "history"] = ["i01"]
    with pytest.raises(ValueError, match="row 7: history and history_actions"):
        model.predict(bad_hist)
    with pytest.raises(ValueError, match=r"missing column\(s\) action"):
        examples_from_events(pd.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [1.0]}))
    with pytest.raises(ValueError, match="unknown action 'teleport'"):
        ExampleConfig(outcome_actions=("teleport",))
    with pytest.raises(ValueError, match="label itself"):
        ExampleConfig(shown_action="cart", outcome_actions=("add_to_cart",))
    with pytest.raises(ValueError, match="category column 'shelf'"):
        RewardModel(RewardModelConfig(**TINY, category_column="shelf"), HashEmbedder(16)).fit(ex, cat)
