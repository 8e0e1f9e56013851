"""The one event-semantics table, and its use by splits and recommenders, on the typed public logs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset

from dragonrec.data import leave_one_out, load_dataset, shuffle_ties, time_split
from dragonrec.data.stats import item_popularity
from dragonrec.schema import (
    ACTION_MEANING,
    ACTIONS,
    NEGATIVE_ACTIONS,
    POSITIVE_ACTIONS,
    Action,
    Polarity,
    is_positive,
    positive_mask,
)


def test_table_covers_every_action_with_signed_strengths():
    assert set(ACTION_MEANING) == set(ACTIONS)
    for action, m in ACTION_MEANING.items():
        if m.polarity is Polarity.POSITIVE:
            assert m.strength > 0, action
        elif m.polarity is Polarity.NEGATIVE:
            assert m.strength < 0, action
        else:
            assert m.strength == 0, action
    assert NEGATIVE_ACTIONS == {"scroll_past", "remove_from_cart"}
    s = {a: m.strength for a, m in ACTION_MEANING.items()}
    assert s[Action.PURCHASE] > s[Action.ADD_TO_CART] > s[Action.CLICK] > s[Action.VIEW] > 0
    assert is_positive("bought") and not is_positive("ignored") and not is_positive("hover")
    assert positive_mask(["view", "scroll_past", "purchase"]).tolist() == [True, False, True]


def _with_negatives(events: pd.DataFrame, every: int = 3) -> pd.DataFrame:
    """Real events plus, for every `every`-th user, a scroll-past and a remove-from-cart after their last event
    (the newest events: under the old semantics they became the targets)."""
    last = events.groupby("user_id").tail(1)
    last = last[np.arange(len(last)) % every == 0]
    neg = pd.concat([last.assign(action="scroll_past", timestamp=last["timestamp"] + 10),
                     last.assign(action="remove_from_cart", timestamp=last["timestamp"] + 20)])
    out = pd.concat([events, neg], ignore_index=True)
    return out.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("name", ["rees46-multicat-head", "taobao-userbehavior-slice"])
def test_negative_actions_are_never_targets_nor_popularity(name):
    ds = load_dataset(shared_dataset(name))
    assert set(ds.events["action"]) <= POSITIVE_ACTIONS  # these logs only hold positive kinds
    events = _with_negatives(ds.events)
    assert set(events["action"]) & NEGATIVE_ACTIONS
    for split in (leave_one_out(events), time_split(events)):
        for cases in (split.valid, split.test):
            assert len(cases) > 0
            assert positive_mask(cases.target_actions).all(), split.name
            # the target is a real positive event of that user, at that time
            assert np.isfinite(cases.target_times).all()
        # nothing after the validation target is trained on (leave-one-out); negatives stay as context
        if split.name == "leave-one-out":
            assert split.info["events_after_test_target"] > 0
            last_train = split.train.groupby("user_id")["timestamp"].max()
            vt = pd.Series(split.valid.target_times, index=split.valid.user_ids)
            assert (last_train.reindex(vt.index).fillna(-np.inf) <= vt).all()
    # the same users and targets as without the injected negatives: they change nothing that is asked
    plain, neg = leave_one_out(ds.events), leave_one_out(events)
    assert np.array_equal(plain.test.targets, neg.test.targets)
    pop_plain = item_popularity(plain.train, len(ds.catalog))
    pop_neg = item_popularity(neg.train, len(ds.catalog))
    assert np.array_equal(pop_plain, pop_neg)


def test_a_user_with_only_negative_tail_gets_the_last_positive_as_target():
    ev = pd.DataFrame({"user_id": ["u"] * 6, "item_idx": [0, 1, 2, 3, 4, 5],
                       "action": ["view", "purchase", "add_to_cart", "remove_from_cart", "view", "scroll_past"],
                       "timestamp": np.arange(6.0)})
    sp = leave_one_out(ev)
    assert sp.test.targets.tolist() == [4] and sp.valid.targets.tolist() == [2]
    assert sp.test.histories[0].tolist() == [0, 1, 2, 3]
    assert sp.test.actions[0].tolist() == ["view", "purchase", "add_to_cart", "remove_from_cart"]
    assert sp.train["item_idx"].tolist() == [0, 1]


def test_rating_value_is_kept():
    ds = load_dataset(shared_dataset("ml-100k"))
    assert ds.events["value"].between(1, 5).all()
    sp = leave_one_out(ds.events)
    assert sp.train["value"].notna().all()


def test_shuffle_ties_only_reorders_within_a_timestamp():
    ev = pd.DataFrame({"user_id": ["a"] * 5 + ["b"] * 3, "item_idx": np.arange(8),
                       "action": "review", "timestamp": [1, 1, 1, 2, 3, 5, 5, 6]})
    orders = set()
    for seed in range(20):
        out = shuffle_ties(ev, seed)
        assert out["item_idx"].iloc[3:5].tolist() == [3, 4] and out["item_idx"].iloc[7] == 7
        assert sorted(out["item_idx"].iloc[:3]) == [0, 1, 2]
        assert out["timestamp"].is_monotonic_increasing or (out.groupby("user_id")["timestamp"].diff().fillna(0) >= 0).all()
        orders.add(tuple(out["item_idx"].iloc[:3]))
    assert len(orders) > 1
    assert shuffle_ties(ev, 3).equals(shuffle_ties(ev, 3))


def test_same_day_slice_on_beauty():
    ds = load_dataset(shared_dataset("amazon-beauty"))
    sp = leave_one_out(ds.events)
    share = sp.slices["same_day"].mean()
    assert 0.40 < share < 0.47  # the dataset README: 43.5% of test targets share a day with the item before
