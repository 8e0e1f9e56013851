"""Splits: no test or validation event leaks into training; model ids never follow sequence order."""

import numpy as np
import pandas as pd
from conftest import shared_dataset

from dragonrec.data import ItemVocab, cold_item_split, cold_user_mask, leave_one_out, load_dataset, time_split


def test_leave_one_out_by_time(chain_dataset):
    s = leave_one_out(chain_dataset.events)
    ev = chain_dataset.events
    for u, h, t in zip(s.test.user_ids, s.test.histories, s.test.targets):
        seq = ev[ev.user_id == u]["item_idx"].to_numpy()
        assert t == seq[-1] and np.array_equal(h, seq[:-1])  # test history includes the validation item
    for u, h, t in zip(s.valid.user_ids, s.valid.histories, s.valid.targets):
        seq = ev[ev.user_id == u]["item_idx"].to_numpy()
        assert t == seq[-2] and np.array_equal(h, seq[:-2])
    assert len(s.train) == len(ev) - 2 * len(s.test)


def test_no_validation_or_test_event_in_training():
    ds = load_dataset(shared_dataset("amazon-beauty"))
    s = leave_one_out(ds.events)
    ev = ds.events.assign(pos=ds.events.groupby("user_id").cumcount(),
                          n=ds.events.groupby("user_id")["item_idx"].transform("size"))
    held_out = ev[ev.pos >= ev.n - 2][["user_id", "pos"]]
    train_keys = set(zip(s.train.user_id, s.train.timestamp, s.train.item_idx, s.train.order))
    held_keys = set(zip(ev.loc[held_out.index, "user_id"], ev.loc[held_out.index, "timestamp"],
                        ev.loc[held_out.index, "item_idx"], ev.loc[held_out.index, "order"]))
    assert not (train_keys & held_keys)
    assert len(s.test) == 22363 and len(s.valid) == 22363


def test_short_users_only_train():
    ev = pd.DataFrame({"user_id": ["a", "a", "b", "b", "b"], "item_id": list("xyxyz"), "item_idx": [0, 1, 0, 1, 2],
                       "action": ["view"] * 5, "timestamp": [1.0, 2, 1, 2, 3], "order": np.nan})
    s = leave_one_out(ev)
    assert s.test.user_ids.tolist() == ["b"] and len(s.train) == 3
    assert s.info["train_only_users"] == 1


def test_time_split_cases_come_after_training():
    ds = load_dataset(shared_dataset("rees46-multicat-head"))
    s = time_split(ds.events)
    assert s.train["timestamp"].max() < s.info["t_valid"]
    assert len(s.test) > 0
    by_user = ds.events.groupby("user_id")
    for u, h, t in list(zip(s.test.user_ids, s.test.histories, s.test.targets))[:50]:
        ev = by_user.get_group(u)
        first_in_test = ev[ev.timestamp >= s.info["t_test"]].iloc[0]
        assert first_in_test.item_idx == t and len(h) > 0


def test_cold_user_slice_has_the_fewest_training_events(chain_dataset):
    ev = chain_dataset.events
    ev = ev[~((ev.user_id < "u010") & (ev.groupby("user_id").cumcount() < 2))]  # ten users lose two events
    s = leave_one_out(ev.reset_index(drop=True))
    mask = cold_user_mask(s.test, s.train)
    assert set(s.test.user_ids[mask]) == {f"u{u:03d}" for u in range(10)}


def test_cold_item_split_holds_items_out_of_training(chain_dataset):
    s = cold_item_split(chain_dataset.events, frac=0.2, seed=1)
    cold_targets = s.test.targets[s.slices["cold_item"]]
    assert len(cold_targets) > 0
    assert not set(cold_targets) & set(s.train["item_idx"])
    assert not set(s.valid.targets) & set(cold_targets)


def test_item_ids_are_not_assigned_in_sequence_order():
    """The P5 leak: ids in order of first appearance make the test item 'max id + 1'."""
    ds = load_dataset(shared_dataset("amazon-beauty"))
    s = leave_one_out(ds.events)
    vocab = ItemVocab.from_train(s.train["item_idx"].to_numpy(), len(ds.catalog), seed=0)
    # Items that appear only as validation/test targets get no id at all.
    assert set(vocab.catalog_index) == set(s.train["item_idx"])
    # Ids are uncorrelated with first appearance, and the test target is not "the largest id so far + 1".
    first_seen = pd.unique(s.train["item_idx"])
    ids = vocab.encode(first_seen)
    assert abs(np.corrcoef(np.arange(len(ids)), ids)[0, 1]) < 0.05
    target_ids, next_ids = [], []
    for h, t in zip(s.test.histories[:5000], s.test.targets[:5000]):
        hid = vocab.encode(h)
        target_ids.append(vocab.encode([t])[0])
        next_ids.append(hid[hid >= 0].max() + 1 if (hid >= 0).any() else -2)
    assert np.mean(np.array(target_ids) == np.array(next_ids)) < 0.01
    # Catalog order is not a model id either: the vocabulary is a permutation.
    assert abs(np.corrcoef(vocab.catalog_index, np.arange(len(vocab)))[0, 1]) < 0.05


def test_vocab_roundtrip():
    v = ItemVocab.from_train(np.array([5, 3, 3, 9]), n_catalog=10, seed=3)
    assert len(v) == 3
    assert v.encode([5, 3, 9, 0]).tolist()[-1] == -1
    assert np.array_equal(ItemVocab.from_dict(v.to_dict()).catalog_index, v.catalog_index)
