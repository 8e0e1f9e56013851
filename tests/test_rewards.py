"""Heuristic rewards on hand-made logs: which impression each event answers, and what each slot earned."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from dragonrec.rewards import (
    RewardConfig,
    attribute,
    attribute_events,
    explode_impressions,
    impression_rewards,
    rewards,
)
from dragonrec.schema import ACTION_MEANING, Impression


def events(*rows) -> pd.DataFrame:
    """(user, item, action, timestamp[, request_id[, value]]) tuples as a canonical events table."""
    full = [tuple(r) + (None,) * (6 - len(r)) for r in rows]
    return pd.DataFrame(full, columns=["user_id", "item_id", "action", "timestamp", "request_id", "value"])


def imp(request_id, user_id, items, ts, **kw) -> Impression:
    return Impression(request_id=request_id, user_id=user_id, item_ids=list(items), timestamp=ts, **kw)


def slot(table: pd.DataFrame, request_id: str, item_id: str) -> pd.Series:
    rows = table[(table["request_id"] == request_id) & (table["item_id"] == item_id)]
    assert len(rows) == 1
    return rows.iloc[0]


def rewarded(impressions, evs, **cfg) -> pd.DataFrame:
    c = RewardConfig(**cfg)
    return rewards(attribute(impressions, evs, c), c)


# ---------------------------------------------------------------- the weight table


def test_default_weights_are_the_event_table_and_keep_the_order():
    w = RewardConfig().weights
    assert w == {a.value: m.strength for a, m in ACTION_MEANING.items()}
    assert w["purchase"] > w["add_to_cart"] > w["click"] > w["hover"] >= 0 > w["scroll_past"]
    assert w["remove_from_cart"] < 0


def test_weights_override_by_any_spelling_and_the_rest_keep_their_defaults():
    w = RewardConfig(weights={"clicked": 0.5, "cart": 0.8}).weights
    assert w["click"] == 0.5 and w["add_to_cart"] == 0.8 and w["purchase"] == 1.0
    with pytest.raises(ValueError, match="unknown action.*'teleport'"):
        RewardConfig(weights={"teleport": 1.0})


def test_an_inconsistent_table_is_refused_or_warned_as_asked():
    with pytest.raises(ValueError, match=r"add_to_cart \(0.7\) > click \(0.9\) fails"):
        RewardConfig(weights={"click": 0.9})
    with pytest.raises(ValueError, match="scroll_past"):
        RewardConfig(weights={"scroll_past": 0.1})
    with pytest.warns(UserWarning, match="remove_from_cart"):
        RewardConfig(weights={"remove_from_cart": 0.0}, check_order="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RewardConfig(weights={"click": 0.9}, check_order="off").weights["click"] == 0.9


# ---------------------------------------------------------------- attribution


def test_an_event_with_a_request_id_answers_that_impression_even_when_a_later_one_showed_the_item():
    imps = [imp("r1", "u", "abc", 100.0), imp("r2", "u", "ad", 200.0)]
    ev = attribute_events(imps, events(("u", "a", "click", 300.0, "r1")))
    assert ev.loc[0, "attributed_request_id"] == "r1" and ev.loc[0, "position"] == 0
    assert ev.loc[0, "attributed_by"] == "request_id"
    slots = attribute(imps, events(("u", "a", "click", 300.0, "r1")))
    assert slot(slots, "r1", "a")["actions"] == ("click",) and slot(slots, "r2", "a")["actions"] == ()


def test_an_untagged_event_answers_the_latest_impression_of_that_user_and_item_within_the_window():
    imps = [imp("r1", "u", "ab", 0.0), imp("r2", "u", "a", 2000.0), imp("r3", "v", "a", 0.0)]
    evs = events(("u", "a", "click", 1000.0),   # r1 (r2 not shown yet)
                 ("u", "a", "hover", 2500.0),   # r2: the latest that showed it
                 ("u", "b", "click", 5000.0),   # r1 showed b 5000 s before: outside the window
                 ("w", "a", "click", 10.0))     # nobody showed `a` to w
    ev = attribute_events(imps, evs, RewardConfig(window_s=3600))
    assert ev["attributed_request_id"].tolist()[:2] == ["r1", "r2"]
    assert ev["attributed_by"].tolist()[:2] == ["time", "time"]
    assert ev["position"].tolist()[2:] == [-1, -1]
    assert attribute(imps, evs, RewardConfig(window_s=3600)).attrs["unattributed_events"] == 2
    # A wider window reaches it; an event before any impression never answers it.
    assert attribute_events(imps, evs, RewardConfig(window_s=6000)).loc[2, "attributed_request_id"] == "r1"
    early = attribute_events([imp("r1", "u", "a", 100.0)], events(("u", "a", "click", 50.0)))
    assert early.loc[0, "position"] == -1


def test_a_delayed_purchase_goes_to_the_impression_that_led_to_the_click():
    imps = [imp("r1", "u", "ab", 0.0), imp("r2", "u", "ca", 100.0)]  # r2 shows `a` again, ignored
    evs = events(("u", "a", "click", 10.0, "r1"),
                 ("u", "a", "add_to_cart", 150.0),
                 ("u", "a", "purchase", 200.0))
    ev = attribute_events(imps, evs, RewardConfig(window_s=1000))
    assert ev["attributed_request_id"].tolist() == ["r1", "r1", "r1"]
    assert ev["attributed_by"].tolist() == ["request_id", "chain", "chain"]
    slots = rewarded(imps, evs, window_s=1000)
    assert slot(slots, "r1", "a")["actions"] == ("click", "add_to_cart", "purchase")
    assert slot(slots, "r1", "a")["reward"] == 1.0 and slot(slots, "r2", "a")["reward"] == 0.0
    # The window runs from the click: a purchase 150 s after the impression, 60 s after the click, counts.
    late = attribute_events([imp("r1", "u", "a", 0.0)],
                            events(("u", "a", "click", 90.0, "r1"), ("u", "a", "purchase", 150.0)),
                            RewardConfig(window_s=100))
    assert late["attributed_request_id"].tolist() == ["r1", "r1"]
    # Without a click, a downstream action falls back to the latest impression that showed the item.
    direct = attribute_events(imps, events(("u", "c", "add_to_cart", 120.0)), RewardConfig(window_s=1000))
    assert direct.loc[0, "attributed_request_id"] == "r2" and direct.loc[0, "attributed_by"] == "time"


def test_a_tagged_event_for_an_item_its_impression_did_not_show_falls_back_to_time():
    imps = [imp("r1", "u", "ab", 0.0), imp("r2", "u", "c", 5.0)]
    evs = events(("u", "c", "click", 10.0, "r1"), ("u", "a", "click", 10.0, "r-unknown"))
    ev = attribute_events(imps, evs)
    assert ev["attributed_request_id"].tolist() == ["r2", "r1"]
    assert ev["attributed_by"].tolist() == ["time", "time"]


# ---------------------------------------------------------------- rewards


def test_a_reviews_rating_scales_its_reward_and_an_unrated_review_gets_the_plain_weight():
    imps = [imp("r1", "u", "abcde", 0.0)]
    evs = events(("u", "a", "review", 10.0, "r1", 5.0), ("u", "b", "review", 10.0, "r1", 1.0),
                 ("u", "c", "review", 10.0, "r1", 4.0), ("u", "d", "review", 10.0, "r1", None),
                 ("u", "e", "review", 10.0, "r1", 9.0))
    r = rewarded(imps, evs)
    assert r["reward"].tolist() == [1.0, -1.0, 0.5, 1.0, 1.0]  # 9 stars on a 1-5 scale is clipped to 1
    ten = rewarded(imps, evs, rating_midpoint=5.5, rating_half_range=4.5)  # a 1-10 scale
    assert ten["reward"].tolist()[:2] == pytest.approx([-1 / 9, -1.0])


def test_a_rated_review_overrides_the_purchase_unless_told_to_combine():
    imps = [imp("r1", "u", "a", 0.0)]
    evs = events(("u", "a", "purchase", 10.0, "r1"), ("u", "a", "review", 20.0, "r1", 1.0))
    assert rewarded(imps, evs)["reward"].tolist() == [-1.0]
    assert rewarded(imps, evs, rating_overrides=False)["reward"].tolist() == [1.0]
    assert rewarded(imps, evs, rating_overrides=False, combine="sum")["reward"].tolist() == [0.0]


def test_scroll_past_is_negative_an_untouched_slot_gets_the_ignored_weight():
    imps = [imp("r1", "u", "abcd", 0.0)]
    evs = events(("u", "a", "scroll_past", 1.0, "r1"), ("u", "b", "hover", 1.0, "r1"),
                 ("u", "c", "remove_from_cart", 1.0, "r1"))
    assert rewarded(imps, evs)["reward"].tolist() == [-0.2, 0.0, -0.5, 0.0]
    assert rewarded(imps, evs, ignored_weight=-0.05)["reward"].tolist() == [-0.2, 0.0, -0.5, -0.05]


def test_several_actions_on_a_slot_take_the_deepest_step_or_a_capped_sum():
    imps = [imp("r1", "u", "ab", 0.0)]
    evs = events(("u", "a", "click", 1.0, "r1"), ("u", "a", "click", 2.0, "r1"),
                 ("u", "a", "add_to_cart", 3.0, "r1"), ("u", "a", "purchase", 4.0, "r1"),
                 ("u", "b", "click", 1.0, "r1"), ("u", "b", "remove_from_cart", 2.0, "r1"))
    assert rewarded(imps, evs)["reward"].tolist() == [1.0, 0.4]
    assert rewarded(imps, evs, combine="sum")["reward"].tolist() == pytest.approx([1.0, -0.1])
    # Distinct actions: the second click adds nothing. 0.4 + 0.7 + 1.0 = 2.1
    assert rewarded(imps, evs, combine="sum", sum_cap=5.0)["reward"].tolist() == pytest.approx([2.1, -0.1])
    counts = attribute(imps, evs)
    assert counts["n_click"].tolist() == [2, 1] and counts["n_purchase"].tolist() == [1, 0]


def test_impression_rewards_sum_or_mean_and_pass_propensities_through():
    imps = [imp("r1", "u", "abc", 0.0, propensities=[0.5, 0.25, None], model_version="v3"),
            imp("r2", "u", "de", 1.0)]
    evs = events(("u", "a", "purchase", 1.0, "r1"), ("u", "b", "scroll_past", 1.0, "r1"),
                 ("u", "d", "click", 2.0, "r2"))
    r = rewarded(imps, evs)
    assert r["propensity"].tolist()[:2] == [0.5, 0.25] and np.isnan(r["propensity"].tolist()[2])
    per = impression_rewards(r).set_index("request_id")
    assert per.loc["r1", "reward"] == pytest.approx(0.8) and per.loc["r2", "reward"] == pytest.approx(0.4)
    assert per.loc["r1", ["n_shown", "n_acted", "n_positive"]].tolist() == [3, 2, 1]
    assert per.loc["r1", "propensities"][:2] == (0.5, 0.25) and per.loc["r2", "propensities"] is None
    assert per.loc["r1", "model_version"] == "v3"
    mean = impression_rewards(r, RewardConfig(per_impression="mean")).set_index("request_id")
    assert mean.loc["r1", "reward"] == pytest.approx(0.8 / 3)


def test_impressions_as_objects_dicts_or_a_dataframe_give_the_same_slots():
    imps = [imp("r1", "u", ["a", "b"], 0.0), imp("r2", "v", ["c"], 5.0)]
    dicts = [i.model_dump() for i in imps]
    frame = pd.DataFrame(dicts)
    evs = events(("u", "b", "click", 1.0), ("v", "c", "purchase", 6.0, "r2"))
    want = rewarded(imps, evs)
    for other in (dicts, frame):
        got = rewarded(other, evs)
        assert got[["request_id", "position", "item_id", "reward"]].equals(
            want[["request_id", "position", "item_id", "reward"]])
    assert explode_impressions(imps)["position"].tolist() == [0, 1, 0]


def test_every_tagged_event_of_a_random_log_answers_its_own_request():
    rng = np.random.default_rng(0)
    n_imp, k = 300, 8
    imps = [imp(f"r{i}", f"u{rng.integers(40)}", [f"i{j}" for j in rng.choice(200, k, replace=False)],
                float(i * 10)) for i in range(n_imp)]
    which, pos = rng.integers(n_imp, size=3000), rng.integers(k, size=3000)
    evs = pd.DataFrame({"user_id": [imps[w].user_id for w in which],
                        "item_id": [imps[w].item_ids[p] for w, p in zip(which, pos, strict=True)],
                        "action": rng.choice(["click", "scroll_past", "purchase", "hover"], size=3000),
                        "timestamp": which * 10.0 + rng.uniform(0, 50, 3000),
                        "request_id": [f"r{w}" for w in which]})
    ev = attribute_events(imps, evs)
    assert (ev["attributed_request_id"] == evs["request_id"]).all()
    assert (ev["position"].to_numpy() == pos).all()
    slots = attribute(imps, evs)
    counts = slots[[c for c in slots if c.startswith("n_")]].to_numpy()
    assert len(slots) == n_imp * k and counts.sum() == 3000


# ---------------------------------------------------------------- malformed input


def test_malformed_events_fail_with_the_reason():
    imps = [imp("r1", "u", "a", 0.0)]
    with pytest.raises(ValueError, match="missing column.*action"):
        attribute(imps, pd.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [1.0]}))
    with pytest.raises(ValueError, match="unknown action.*'teleport'"):
        attribute(imps, events(("u", "a", "teleport", 1.0)))
    with pytest.raises(ValueError, match="non-numeric timestamp 'noon'"):
        attribute(imps, events(("u", "a", "click", "noon")))
    with pytest.raises(ValueError, match="without timestamp"):
        attribute(imps, events(("u", "a", "click", None)))
    with pytest.raises(ValueError, match="pass the output of attribute"):
        rewards(events(("u", "a", "click", 1.0)))


def test_malformed_impressions_fail_with_the_reason():
    evs = events(("u", "a", "click", 1.0))
    with pytest.raises(ValueError, match="'r1' appears twice"):
        attribute([imp("r1", "u", "a", 0.0), imp("r1", "u", "b", 0.0)], evs)
    with pytest.raises(ValueError, match="item_ids must be a list"):
        attribute([{"request_id": "r1", "user_id": "u", "item_ids": "abc"}], evs)
    with pytest.raises(ValueError, match="one number per shown item"):
        attribute([{"request_id": "r1", "user_id": "u", "item_ids": ["a", "b"], "propensities": [0.5]}], evs)
    with pytest.raises(ValueError, match="outside"):
        attribute([{"request_id": "r1", "user_id": "u", "item_ids": ["a"], "propensities": [1.5]}], evs)
    with pytest.raises(ValueError, match="missing column.*item_ids"):
        attribute(pd.DataFrame({"request_id": ["r1"], "user_id": ["u"]}), evs)
    with pytest.raises(ValueError, match="no user_id"):
        attribute([{"request_id": "r1", "user_id": None, "item_ids": ["a"]}], evs)
