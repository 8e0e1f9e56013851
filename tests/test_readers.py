"""Readers: the public datasets as they are, a user's own column names, and clear errors on bad input."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import chain_events, chain_items, shared_dataset

from dragonrec.data import DataError, load_dataset, load_feedback_log, load_items
from dragonrec.data.readers import parse_user_action
from dragonrec.schema import Action


def write_csv_dataset(d: Path, events: pd.DataFrame, items: pd.DataFrame | None = None) -> Path:
    d.mkdir(exist_ok=True)
    (items if items is not None else chain_items()).to_csv(d / "items.csv", index=False)
    events.to_csv(d / "interactions.csv", index=False)
    return d


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_every_format_reads_the_same(tmp_path, fmt):
    d = tmp_path / fmt
    d.mkdir()
    items, events = chain_items(), chain_events(n_users=5)
    if fmt == "parquet":
        items.to_parquet(d / "items.parquet"); events.to_parquet(d / "interactions.parquet")
    elif fmt == "csv":
        items.to_csv(d / "items.csv", index=False); events.to_csv(d / "interactions.csv", index=False)
    else:
        items.to_json(d / "items.jsonl", orient="records", lines=True)
        events.to_json(d / "interactions.jsonl", orient="records", lines=True)
    ds = load_dataset(d)
    assert len(ds.catalog) == 12 and len(ds.events) == 30
    assert set(ds.events["action"]) == {"purchase"}
    assert ds.events["timestamp"].dtype.kind == "f"
    assert ds.catalog.item(3).title == "Product number 3"


def test_events_are_ordered_by_time_then_explicit_order(tmp_path):
    ev = pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["i02", "i01", "i00"], "timestamp": [5, 5, 1],
                       "seq_idx": [1, 0, 0], "action": ["view"] * 3})
    ds = load_dataset(write_csv_dataset(tmp_path / "d", ev))
    assert ds.events["item_id"].tolist() == ["i00", "i01", "i02"]


def test_user_column_mapping(tmp_path):
    ev = pd.DataFrame({"customer": ["a", "a"], "sku": ["i00", "i01"], "when": [1, 2], "kind": ["clicked", "buy"]})
    d = write_csv_dataset(tmp_path / "d", ev)
    ds = load_dataset(d, event_mapping={"user_id": "customer", "item_id": "sku", "timestamp": "when", "action": "kind"})
    assert ds.events["action"].tolist() == ["click", "purchase"]
    with pytest.raises(DataError, match="mapping says 'user_id' is 'client'"):
        load_dataset(d, event_mapping={"user_id": "client"})


def test_missing_column_names_file_and_columns(tmp_path):
    ev = pd.DataFrame({"user_id": ["a"], "item_id": ["i00"]})
    with pytest.raises(DataError, match=r"interactions.csv: missing column: timestamp"):
        load_dataset(write_csv_dataset(tmp_path / "d", ev))


@pytest.mark.parametrize("column,value,problem", [
    ("action", "teleported", "unknown action: 'teleported'"),
    ("item_id", "nope", "unknown item: 'nope'"),
    ("timestamp", "yesterday", "non-numeric timestamp: 'yesterday'"),
])
def test_bad_row_is_located_or_skipped(tmp_path, column, value, problem):
    ev = chain_events(n_users=2).astype({"timestamp": object})
    ev.loc[4, column] = value
    d = write_csv_dataset(tmp_path / "d", ev)
    with pytest.raises(DataError) as err:
        load_dataset(d)
    assert problem in str(err.value)
    assert "interactions.csv: line 6" in str(err.value)  # row 4 + header + 1-based
    ds = load_dataset(d, on_error="skip")
    assert len(ds.events) == len(ev) - 1
    assert ds.report.n_skipped == 1
    assert problem in ds.report.examples[problem.split(":")[0]][0]


def test_malformed_jsonl_line(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    chain_items().to_csv(d / "items.csv", index=False)
    lines = [json.dumps({"user_id": "u", "item_id": "i00", "timestamp": 1}), "{not json", json.dumps(
        {"user_id": "u", "item_id": "i01", "timestamp": 2})]
    (d / "interactions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"interactions.jsonl: line 2: malformed JSON"):
        load_dataset(d)
    assert len(load_dataset(d, on_error="skip").events) == 2


def test_broken_parquet_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "items.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "interactions.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="items.parquet: cannot read file"):
        load_dataset(d)


def test_duplicate_item_ids(tmp_path):
    items = pd.concat([chain_items(), chain_items().iloc[:1]])
    items.to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataError, match=r"line 14: duplicate item_id 'i00'"):
        load_items(tmp_path / "items.csv")


@pytest.mark.parametrize("text,action,item", [
    ("clicked prod_45", Action.CLICK, "prod_45"), ("purchased prod_6", Action.PURCHASE, "prod_6"),
    ("added prod_5 to cart", Action.ADD_TO_CART, "prod_5"), ("removed prod_5 from cart", Action.REMOVE_FROM_CART, "prod_5"),
    ("scrolled past prod_9", Action.SCROLL_PAST, "prod_9"), ("ignored", Action.SCROLL_PAST, None),
])
def test_parse_user_action(text, action, item):
    assert parse_user_action(text) == (action, item)


def test_feedback_log(tmp_path):
    log = tmp_path / "feedback.jsonl"
    log.write_text("\n".join(json.dumps(x) for x in [
        {"user_browsing_history": ["prod_1", "prod_2"], "llm_recommendations": ["prod_45", "prod_46"],
         "user_action": "clicked prod_45"},
        {"user_browsing_history": ["prod_3"], "llm_recommendations": ["prod_7", "prod_8"], "user_action": "ignored",
         "user_id": "alice"},
    ]) + "\n")
    events, impressions, catalog = load_feedback_log(log)
    assert [i.item_ids for i in impressions] == [["prod_45", "prod_46"], ["prod_7", "prod_8"]]
    first = events[events["user_id"] == "feedback-line-1"]
    assert first["item_id"].tolist() == ["prod_1", "prod_2", "prod_45"]
    assert first["action"].tolist() == ["view", "view", "click"]
    assert first["request_id"].iloc[-1] == impressions[0].request_id
    alice = events[events["user_id"] == "alice"]
    assert alice[alice["action"] == "scroll_past"]["item_id"].tolist() == ["prod_7", "prod_8"]
    assert "prod_46" in catalog
    ds = load_dataset(log)  # a single log file is a dataset too
    assert len(ds.impressions) == 2


def test_feedback_log_errors(tmp_path):
    log = tmp_path / "feedback.jsonl"
    log.write_text(json.dumps({"user_browsing_history": [], "llm_recommendations": ["a"], "user_action": "yodelled a"})
                   + "\n" + json.dumps({"user_browsing_history": ["a"], "llm_recommendations": ["b"]}) + "\n")
    with pytest.raises(DataError, match="feedback.jsonl: line 1: unknown action"):
        load_feedback_log(log)
    events, impressions, _ = load_feedback_log(log, on_error="skip")
    assert impressions == [] and len(events) == 0


@pytest.mark.parametrize("name,users,items,events", [
    ("amazon-beauty", 22363, 12101, 198502),
    ("rees46-multicat-head", 4504, 6493, 17434),
    ("taobao-userbehavior-slice", 58732, 75384, 96168),
])
def test_shared_datasets_read_as_they_are(name, users, items, events):
    ds = load_dataset(shared_dataset(name))
    assert ds.counts()["users"] == users and len(ds.catalog) == items and len(ds.events) == events
    assert ds.report.n_skipped == 0
