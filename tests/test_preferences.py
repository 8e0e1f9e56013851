"""Preference pairs and groups on hand-made impressions, and the original design's log end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dragonrec.data.readers import load_feedback_log
from dragonrec.preferences import RECORD_KEYS, PreferenceConfig, build_groups, build_pairs, to_records
from dragonrec.rewards import RewardConfig, attribute, rewards
from dragonrec.schema import Impression


def events(*rows) -> pd.DataFrame:
    """(user, item, action, timestamp[, request_id[, value]]) tuples as a canonical events table."""
    full = [tuple(r) + (None,) * (6 - len(r)) for r in rows]
    return pd.DataFrame(full, columns=["user_id", "item_id", "action", "timestamp", "request_id", "value"])


def imp(request_id, user_id, items, ts) -> Impression:
    return Impression(request_id=request_id, user_id=user_id, item_ids=list(items), timestamp=ts)


def rewarded(impressions, evs, **cfg) -> pd.DataFrame:
    c = RewardConfig(**cfg)
    return rewards(attribute(impressions, evs, c), c)


# One impression of four: `a` bought (1.0), `b` scrolled past (-0.2), `c` ignored (0.0), `d` clicked (0.4).
IMPS = [imp("r1", "u", "abcd", 100.0)]
EVENTS = events(("u", "x", "view", 10.0), ("u", "y", "click", 20.0),
                ("u", "a", "click", 110.0, "r1"), ("u", "a", "purchase", 130.0, "r1"),
                ("u", "b", "scroll_past", 105.0, "r1"), ("u", "d", "click", 120.0, "r1"))


def pairs_of(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(c, r): round(m, 9) for c, r, m in zip(df["chosen"], df["rejected"], df["margin"], strict=True)}


def test_pairs_from_one_impression_chosen_against_ignored_and_scrolled_past():
    p = build_pairs(rewarded(IMPS, EVENTS), EVENTS)
    assert pairs_of(p) == {("a", "b"): 1.2, ("a", "c"): 1.0, ("d", "b"): 0.6, ("d", "c"): 0.4}
    assert set(p["request_id"]) == {"r1"} and (p["weight"] == 1.0).all()
    # Graded: with rejected_positives the purchase also beats the click.
    graded = build_pairs(rewarded(IMPS, EVENTS), EVENTS, PreferenceConfig(rejected_positives=True))
    assert pairs_of(graded)[("a", "d")] == 0.6 and ("d", "a") not in pairs_of(graded)


def test_no_pairs_without_a_positive_action_nor_between_equal_rewards():
    imps = [imp("r1", "u", "abc", 0.0), imp("r2", "u", "de", 0.0)]
    evs = events(("u", "a", "scroll_past", 1.0, "r1"), ("u", "b", "hover", 1.0, "r1"),
                 ("u", "d", "click", 1.0, "r2"), ("u", "e", "click", 1.0, "r2"))
    cfg = PreferenceConfig(rejected_positives=True)
    assert build_pairs(rewarded(imps, evs), evs, cfg).empty
    assert build_groups(rewarded(imps, evs), evs, cfg).empty
    # A slot nobody touched is not "acted on positively", even when ignoring earns something.
    assert build_pairs(rewarded(imps[:1], evs, ignored_weight=0.1), evs).empty


def test_min_margin_keeps_strong_pairs_and_weights_can_be_the_margin():
    r = rewarded(IMPS, EVENTS)
    strong = build_pairs(r, EVENTS, PreferenceConfig(min_margin=0.5, weight_by_margin=True))
    assert pairs_of(strong) == {("a", "b"): 1.2, ("a", "c"): 1.0, ("d", "b"): 0.6}
    assert strong["weight"].tolist() == strong["margin"].tolist()
    # 1.0 - 0.8 is 0.19999999999999996 in floats: it still clears a 0.2 bar.
    r = rewarded(IMPS, EVENTS, weights={"click": 0.8, "add_to_cart": 0.9})
    edge = build_pairs(r, EVENTS, PreferenceConfig(min_margin=0.2, rejected_positives=True))
    assert ("a", "d") in pairs_of(edge)


def test_groups_one_chosen_against_every_rejected_of_its_impression():
    g = build_groups(rewarded(IMPS, EVENTS), EVENTS).set_index("chosen")
    assert list(g.index) == ["a", "d"]
    assert g.loc["a", "rejected"] == ["b", "c"] and g.loc["a", "margin"] == pytest.approx([1.2, 1.0])
    assert g.loc["d", "rejected"] == ["b", "c"] and g.loc["d", "rejected_position"] == [1, 2]
    records = to_records(g.reset_index())
    assert records[0]["rejected"] == ["b", "c"] and isinstance(records[0]["margin"], list)


def test_history_is_the_last_events_strictly_before_the_impression():
    imps = [imp("r1", "u", "abcd", 100.0)]
    evs = pd.concat([EVENTS, events(("u", "z", "view", 100.0), ("v", "q", "view", 50.0),
                                    ("u", "late", "purchase", 500.0))], ignore_index=True)
    p = build_pairs(rewarded(imps, evs), evs)
    # Not the event at the impression's own time, not r1's answers, not another user's, not later ones.
    assert p["history"].iloc[0] == ["x", "y"] and p["history_actions"].iloc[0] == ["view", "click"]
    short = build_pairs(rewarded(imps, evs), evs, PreferenceConfig(history_len=1))
    assert short["history"].iloc[0] == ["y"]
    none = build_pairs(rewarded(imps, evs), evs, PreferenceConfig(history_len=0))
    assert none["history"].iloc[0] == []
    untimed = [Impression(request_id="r1", user_id="u", item_ids=list("abcd"))]  # only tagged events answer
    assert build_pairs(rewarded(untimed, evs), evs)["history"].iloc[0] == []


def test_records_have_the_shape_dpo_code_reads():
    records = to_records(build_pairs(rewarded(IMPS, EVENTS), EVENTS))
    assert len(records) == 4 and set(records[0]) == set(RECORD_KEYS)
    first = records[0]
    assert first == {"request_id": "r1", "user_id": "u", "history": ["x", "y"],
                     "history_actions": ["view", "click"], "chosen": "a", "rejected": "b",
                     "margin": pytest.approx(1.2), "weight": 1.0}
    assert type(first["margin"]) is float and json.dumps(records)
    with pytest.raises(ValueError, match="build_pairs"):
        to_records(pd.DataFrame({"chosen": ["a"]}))
    with pytest.raises(ValueError, match="output of rewards"):
        build_pairs(pd.DataFrame({"request_id": ["r1"]}), EVENTS)


def test_the_original_feedback_log_goes_through_attribute_rewards_and_pairs(tmp_path):
    lines = [
        {"user_id": "u1", "timestamp": 1000, "user_browsing_history": ["p1", "p2"],
         "llm_recommendations": ["p3", "p4", "p5"], "user_action": "clicked p4"},
        {"user_id": "u1", "timestamp": 2000, "user_browsing_history": ["p4"],
         "llm_recommendations": ["p6", "p7"], "user_action": "purchased p7"},
        {"user_id": "u2", "timestamp": 1500, "user_browsing_history": ["p1"],
         "llm_recommendations": ["p2", "p3"], "user_action": "ignored"},
        {"user_id": "u3", "timestamp": 1700, "user_browsing_history": [],
         "llm_recommendations": ["p1", "p2", "p3"], "user_action": "added p2 to cart"},
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    evs, imps, _ = load_feedback_log(path)
    slots = rewarded(imps, evs)
    # Browsing histories answer no impression, except u1's second look at p4: a product view after the
    # click from r1, so it belongs to r1's slot (the click, the deeper step, still sets the reward).
    assert slots.attrs["unattributed_events"] == 3
    first_p4 = slots["item_id"].eq("p4") & slots["request_id"].str.endswith("-1")
    assert slots.loc[first_p4, "actions"].item() == ("click", "view")
    assert slots.loc[slots["reward"] != 0, ["item_id", "reward"]].values.tolist() == [
        ["p4", 0.4], ["p7", 1.0], ["p2", -0.2], ["p3", -0.2], ["p2", 0.7]]
    p = build_pairs(slots, evs)
    assert pairs_of(p) == {("p4", "p3"): 0.4, ("p4", "p5"): 0.4, ("p7", "p6"): 1.0,
                           ("p2", "p1"): 0.7, ("p2", "p3"): 0.7}
    second = p[p["chosen"] == "p7"].iloc[0]
    # u1's second request: the first line's history and click, then its own history, never its purchase.
    assert second["history"] == ["p1", "p2", "p4", "p4"]
    assert second["history_actions"] == ["view", "view", "click", "view"]
    assert p[p["chosen"] == "p2"].iloc[0]["history"] == []
