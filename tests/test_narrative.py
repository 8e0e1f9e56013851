"""Session narratives: grouping, titles instead of ids, and narrative -> events -> narrative round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import shared_dataset

from dragonrec.data import Catalog
from dragonrec.model.narrative import (
    ItemNames,
    Narrative,
    group_actions,
    parse_text,
    parse_tokens,
    to_text,
    to_tokens,
)
from dragonrec.schema import ACTIONS


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(pd.DataFrame({
        "item_id": ["B001", "B002", "B003", "B004", "B005", "B006", "B007", "B008"],
        "title": ["Rose Hand Cream", 'Brush 12" Pro, Large', "Lip Balm", "Lip Balm", None, "Night   Cream",
                  "Eye Serum, 30 ml", "Argan Oil Shampoo"],
        "brand": ["acme", "zen", None, None, "Glowco", None, None, None],
        "category": ["Beauty > Skin", "Beauty > Tools", "Beauty > Lips", "Beauty > Lips", "Beauty > Face > Masks",
                     "Beauty > Skin", "Beauty > Eyes", "Beauty > Hair"],
    }))


def test_group_actions_joins_consecutive_equal_actions():
    got = group_actions([1, 2, 5, 6, 7], ["view", "view", "add_to_cart", "purchase", "view"])
    assert [(a.value, items) for a, items in got] == [("view", [1, 2]), ("add_to_cart", [5]),
                                                      ("purchase", [6]), ("view", [7])]


def test_text_reads_like_the_design_and_uses_titles_not_ids(catalog):
    names = ItemNames(catalog)
    n = Narrative([0, 7, 5, 6], ["view", "view", "add_to_cart", "purchase"], recommend=[1, 4])
    text = to_text(n, names)
    assert text == ('User viewed "Rose Hand Cream", "Argan Oil Shampoo", added "Night Cream" to cart, '
                    'purchased "Eye Serum, 30 ml". Recommend: "Brush 12\' Pro, Large", "Glowco Masks (untitled)".')
    assert not any(item_id in text for item_id in catalog.item_ids)
    # duplicate titles get distinct names; a missing title is named from brand and category
    assert {names.name(2), names.name(3)} == {"Lip Balm (variant 1)", "Lip Balm (variant 2)"}
    assert len(set(names.names)) == len(catalog)


def test_text_round_trip_every_action_and_prompt_form(catalog):
    names = ItemNames(catalog)
    rng = np.random.default_rng(0)
    for _ in range(50):
        length = int(rng.integers(0, 9))
        acts = [ACTIONS[k].value for k in rng.integers(0, len(ACTIONS), size=length)]
        rec = None if rng.random() < 0.3 else rng.choice(8, size=int(rng.integers(0, 3)), replace=False).tolist()
        n = Narrative(rng.integers(0, 8, size=length), acts, rec)
        text = to_text(n, names)
        back = parse_text(text, names)
        assert back.history.tolist() == n.history.tolist() and back.actions == n.actions
        assert back.recommend == n.recommend
        assert to_text(back, names) == text
    assert to_text(Narrative([], [], []), names) == "User has no history yet. Recommend:"


def test_text_with_product_tokens_round_trips(catalog):
    names = ItemNames(catalog)
    model_id = {0: 4, 1: 0, 5: 2, 6: 1, 7: 3}  # item 2..4 never seen in training: no token
    inverse = {k: i for i, k in model_id.items()}
    token = lambda i: f"<item_{model_id[i]}>" if i in model_id else None
    n = Narrative([0, 2, 5], ["view", "view", "favorite"], recommend=[6, 1])
    text = to_text(n, names, item_token=token)
    assert text == (f'User viewed "Rose Hand Cream" <item_4>, "{names.name(2)}", saved "Night Cream" <item_2> '
                    'to favorites. Recommend: <item_1>, <item_0>.')
    back = parse_text(text, names, token_item=inverse.__getitem__)
    assert back.history.tolist() == [0, 2, 5] and back.recommend == [6, 1]
    with pytest.raises(ValueError, match="recommended item has no product token"):
        to_text(Narrative([0], ["view"], [2]), names, item_token=token)
    with pytest.raises(ValueError, match="title names catalog item 0 but its token names 5"):
        parse_text('User viewed "Rose Hand Cream" <item_2>.', names, token_item=inverse.__getitem__)


@pytest.mark.parametrize("bad, problem", [
    ('User looked at "Lip Balm (variant 1)".', "expected an action verb"),
    ('User added "Rose Hand Cream".', "expected ' to cart'"),
    ('User viewed "No Such Thing".', "no catalog item is named 'No Such Thing'"),
    ('User viewed "Rose Hand Cream". Recommend: B003.', "expected a quoted product title"),
    ('User viewed "Rose Hand Cream" <item_1>.', "no token_item mapping"),
])
def test_malformed_text_gives_a_clear_error(catalog, bad, problem):
    with pytest.raises(ValueError, match=problem):
        parse_text(bad, ItemNames(catalog))


def test_token_round_trip_in_the_core_layout(catalog):
    lm = pytest.importorskip("dragonrec.model.lm")
    tok = lm.ItemTokenizer.from_train(np.array([0, 1, 5, 6, 7]), n_catalog=len(catalog), seed=3)
    n = Narrative([0, 7, 5, 6, 6], ["view", "view", "add_to_cart", "purchase", "purchase"], recommend=[1, 0])
    ids = to_tokens(n, tok)
    t = lambda i: lm.ITEM_OFFSET + int(tok.item_ids([i])[0])
    a = tok.action_token
    assert ids == [lm.BOS_ID, lm.USER_ID, a("view"), t(0), t(7), a("add_to_cart"), t(5), a("purchase"), t(6), t(6),
                   lm.RECOMMEND_ID, t(1), t(0), lm.EOS_ID]
    assert tok.to_hf().convert_ids_to_tokens(ids)[:4] == ["[BOS]", "[USER]", "<view>", f"<item_{t(0) - lm.ITEM_OFFSET}>"]
    for grouped in (True, False):
        back = parse_tokens(to_tokens(n, tok, grouped=grouped), tok)
        assert back.history.tolist() == n.history.tolist() and back.actions == n.actions and back.recommend == [1, 0]
        assert to_tokens(back, tok, grouped=grouped) == to_tokens(n, tok, grouped=grouped)
    # the ungrouped history is exactly the core model's narrative encoding
    body = to_tokens(Narrative(n.history, n.actions), tok, grouped=False)
    assert [body[0], *body[2:]] == tok.encode(n.history, n.actions, narrative=True)
    # items without a token drop out of the history (as encode drops them) but may not be recommended
    assert parse_tokens(to_tokens(Narrative([2, 0], ["view", "view"]), tok), tok).history.tolist() == [0]
    with pytest.raises(ValueError, match="no product token"):
        to_tokens(Narrative([0], ["view"], [2]), tok)
    with pytest.raises(ValueError, match="no action token before it"):
        parse_tokens([lm.BOS_ID, t(0)], tok)


def test_real_beauty_catalog_names_are_unique_and_round_trip():
    from dragonrec.data import load_dataset

    ds = load_dataset(shared_dataset("amazon-beauty"))
    names = ItemNames(ds.catalog)
    assert len(set(names.names)) == len(ds.catalog)
    asins = set(ds.catalog.item_ids)
    assert not any(w.strip("(),.") in asins for name in names.names for w in name.split())
    ev = ds.events
    for user in ev["user_id"].drop_duplicates().head(200):
        rows = ev[ev["user_id"] == user]
        n = Narrative(rows["item_idx"].to_numpy()[:-1], rows["action"].tolist()[:-1], [int(rows["item_idx"].iloc[-1])])
        text = to_text(n, names)
        back = parse_text(text, names)
        assert back.history.tolist() == n.history.tolist() and back.recommend == n.recommend
        assert to_text(back, names) == text
