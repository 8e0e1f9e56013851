"""Import files into the store and export it as the training data the models read.

Imports go through the project's readers (`load_events` with its column mapping for parquet, CSV and JSONL
event logs; `load_feedback_log` for the original design's log), and each file is one transaction: it is
stored whole or not at all. Re-importing a file stores nothing new (event ids are derived, see
`Store.add_events`). Exports give the canonical events table (`dragonrec.schema.EVENT_COLUMNS` plus
`item_idx`, sorted by user and time) that `dragonrec.data.splits` and the recommenders take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dragonrec.data.catalog import Catalog
from dragonrec.data.readers import Dataset, OnError, ReadReport, load_events, load_feedback_log
from dragonrec.schema import EVENT_COLUMNS, Action, Impression
from dragonrec.store.store import Store

# The verb phrase `parse_user_action` reads back as each action ("clicked prod_45", "added prod_5 to cart").
_VERBS: dict[str, tuple[str, str]] = {
    Action.VIEW.value: ("viewed", ""),
    Action.HOVER.value: ("hovered", ""),
    Action.CLICK.value: ("clicked", ""),
    Action.SCROLL_PAST.value: ("scrolled past", ""),
    Action.ADD_TO_CART.value: ("added", " to cart"),
    Action.REMOVE_FROM_CART.value: ("removed", " from cart"),
    Action.PURCHASE.value: ("purchased", ""),
    Action.REVIEW.value: ("reviewed", ""),
    Action.FAVORITE.value: ("favorited", ""),
}


@dataclass(frozen=True)
class ImportReport:
    """What importing one file did."""

    path: str
    events_accepted: int
    events_duplicate: int
    impressions_accepted: int = 0
    impressions_duplicate: int = 0
    rows_skipped: int = 0  # bad rows the reader skipped (on_error="skip")


def is_feedback_log(path: Path | str) -> bool:
    """Whether a file is the original design's log: JSON lines, the first with `user_browsing_history`."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    return False
                return isinstance(obj, dict) and "user_browsing_history" in obj
    return False


def import_file(store: Store, path: Path | str, mapping: dict[str, str] | None = None,
                on_error: OnError = "raise") -> ImportReport:
    """Import an event log (parquet, CSV, JSONL) or the original design's feedback log into the store."""
    if is_feedback_log(path):
        return import_feedback_log(store, path, on_error)
    return import_events(store, path, mapping, on_error)


def _catalog(store: Store) -> Catalog | None:
    # The readers then report an unknown item with its file and line, before the store sees it.
    return None if store.known_items is None else Catalog.from_ids(sorted(store.known_items))


def import_events(store: Store, path: Path | str, mapping: dict[str, str] | None = None,
                  on_error: OnError = "raise") -> ImportReport:
    """Import an event log through `load_events` (its default column names, or `mapping`: canonical ->
    the file's column). Bad rows raise `DataError` with file and line, or with `on_error="skip"` are
    skipped and counted."""
    report = ReadReport()
    events = load_events(path, _catalog(store), mapping, on_error, report)
    accepted, duplicates = store.add_events(events)
    return ImportReport(str(path), accepted, duplicates, rows_skipped=report.n_skipped)


def import_feedback_log(store: Store, path: Path | str, on_error: OnError = "raise") -> ImportReport:
    """Import the original design's log (`{"user_browsing_history": [...], "llm_recommendations": [...],
    "user_action": "clicked prod_45"}` a line): its impressions and events, in one transaction."""
    report = ReadReport()
    events, imps, _ = load_feedback_log(path, _catalog(store), on_error, report)
    result = store.write(events=events, impressions=imps)
    return ImportReport(str(path), result.events_accepted, result.events_duplicate,
                        result.impressions_accepted, result.impressions_duplicate, report.n_skipped)


def export_events(store: Store, catalog: Catalog | None = None) -> pd.DataFrame:
    """Every event as the canonical table the models read: `EVENT_COLUMNS` plus `item_idx` (the catalog
    index), sorted by user, time, order. Without a catalog, the catalog is the items the events name
    (`Catalog.from_ids`, in first-seen order), as `load_dataset` makes for a log without one."""
    events = store.all_events()
    if catalog is None:
        catalog = Catalog.from_ids(pd.unique(events["item_id"]))
    out = events.loc[:, list(EVENT_COLUMNS)]
    out["item_idx"] = catalog.indices(out["item_id"]) if len(out) else np.zeros(0, dtype=np.int64)
    return out


def export_impressions(store: Store) -> list[Impression]:
    """Every impression with its shown items, in the order they were shown (time, then arrival)."""
    return store.impressions()


def export_dataset(store: Store, catalog: Catalog | None = None, name: str = "store") -> Dataset:
    """The store as a `Dataset` (catalog, canonical events, impressions), ready for splits and evaluation."""
    events = export_events(store, catalog)
    catalog = catalog or Catalog.from_ids(pd.unique(events["item_id"]))
    return Dataset(name, catalog, events, export_impressions(store))


def write_events(store: Store, path: Path | str) -> int:
    """Write the canonical events table to parquet, CSV or JSONL (by suffix); returns the rows written.
    `load_events` reads the file back."""
    path = Path(path)
    df = export_events(store).drop(columns=["item_idx"])
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix in (".jsonl", ".json"):
        df.to_json(path, orient="records", lines=True)
    else:
        raise ValueError(f"unsupported file type {suffix!r} (use parquet, csv or jsonl)")
    return len(df)


def write_impressions(store: Store, path: Path | str) -> int:
    """Write every impression as JSON lines (`Impression` fields); returns the lines written."""
    imps = export_impressions(store)
    with Path(path).open("w", encoding="utf-8") as f:
        f.writelines(imp.model_dump_json(exclude_none=True) + "\n" for imp in imps)
    return len(imps)


def write_feedback_log(store: Store, path: Path | str) -> tuple[int, int]:
    """Write the store in the original design's log format; returns (lines written, impressions left out).

    One line per impression that some event answers: `user_browsing_history` is the user's views without a
    request id in the second before the impression (where `load_feedback_log` puts a line's history),
    `llm_recommendations` the shown items, `user_action` the answer ("ignored" when every shown item was
    scrolled past, else the first answer: the format holds one action a line). `user_id`, `request_id`
    and `timestamp` are written too, so a log that came in this format reads back into the same
    impressions and events. Impressions nobody answered have no line (the format needs an action).
    """
    events = store.all_events()
    by_user = {u: g for u, g in events[events["request_id"].isna() & (events["action"] == Action.VIEW.value)]
               .groupby("user_id", sort=False)}
    answers = {r: g for r, g in events[events["request_id"].notna()].groupby("request_id", sort=False)}
    written = left_out = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for imp in export_impressions(store):
            answer = answers.get(imp.request_id)
            if answer is None or imp.timestamp is None:
                left_out += 1
                continue
            ts = imp.timestamp
            views = by_user.get(imp.user_id)
            history = ([] if views is None else
                       views[(views["timestamp"] > ts - 1) & (views["timestamp"] < ts)]["item_id"].tolist())
            acts = answer["action"].tolist()
            if (all(a == Action.SCROLL_PAST.value for a in acts)
                    and sorted(answer["item_id"]) == sorted(imp.item_ids) and len(acts) > 1):
                action = "ignored"
            else:
                verb, tail = _VERBS[acts[0]]
                action = f"{verb} {answer['item_id'].iloc[0]}{tail}"
            line = {"user_id": imp.user_id, "request_id": imp.request_id, "timestamp": ts,
                    "user_browsing_history": history, "llm_recommendations": imp.item_ids,
                    "user_action": action}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
    return written, left_out
