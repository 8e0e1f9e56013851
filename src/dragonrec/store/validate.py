"""Checks and converts events and impressions into table rows before anything is written.

A write is all or nothing: every record of a batch is checked first, and the first bad one raises a
`StoreError` that names it (its index in the batch, the field, the problem).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import pandas as pd

from dragonrec.schema import Action, Event, Impression, parse_action

EVENT_FIELDS = ("user_id", "item_id", "action", "timestamp")  # required; the rest are optional


class StoreError(ValueError):
    """A record the store refuses: `kind` ('event' or 'impression'), its `index` in the batch, the `field`."""

    def __init__(self, kind: str, index: int, field: str | None, problem: str, who: str = ""):
        self.kind, self.index, self.field, self.problem = kind, index, field, problem
        where = f"{kind} {index}{' (' + who + ')' if who else ''}"
        what = f"{field}: {problem}" if field else problem
        super().__init__(f"{where}: {what}; nothing of the batch was stored")


def derive_event_id(user_id: str, item_id: str, action: str, timestamp: float, request_id: str | None) -> str:
    """A deterministic id from what identifies an event, so that importing the same file twice stores it
    once. Two events equal in all five fields are the same event to the store."""
    key = json.dumps([user_id, item_id, action, repr(float(timestamp)), request_id], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT


def _text(v: Any, field: str, fail, required: bool) -> str | None:
    """An id-like field: a non-empty string (an integer is taken as its decimal string, as readers do)."""
    if _missing(v):
        if required:
            fail(field, "missing")
        return None
    if isinstance(v, str):
        if not v.strip():
            fail(field, "empty string")
        return str(v)
    if isinstance(v, Integral) and not isinstance(v, bool):
        return str(int(v))
    fail(field, f"wrong type {type(v).__name__} ({v!r}); expected a string")
    return None


def _number(v: Any, field: str, fail, required: bool) -> float | None:
    """A finite number (NaN counts as missing for optional fields)."""
    if _missing(v):
        if required:
            fail(field, "missing" if v is None or not isinstance(v, float) else "NaN")
        return None
    if isinstance(v, bool) or not isinstance(v, Real):
        fail(field, f"wrong type {type(v).__name__} ({v!r}); expected a number")
    f = float(v)
    if not math.isfinite(f):
        fail(field, f"not finite ({f!r})")
    return f


def event_rows(events: Iterable[Event | Mapping[str, Any]] | pd.DataFrame,
               known_items: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Table rows (without ingestion columns) of a batch of events, or StoreError for the first bad one.

    Events are `Event` objects or mappings with the Event fields plus optional `event_id` and `order`
    (extra keys such as `item_idx` are ignored); a DataFrame is read as mappings, one per row.
    """
    records = events.to_dict("records") if isinstance(events, pd.DataFrame) else events
    rows = []
    for index, ev in enumerate(records):
        raw = ev.model_dump() if isinstance(ev, Event) else ev
        if not isinstance(raw, Mapping):
            raise StoreError("event", index, None,
                             f"wrong type {type(ev).__name__}; expected an Event or a mapping")

        def fail(field: str, problem: str, raw=raw, index=index):
            who = ", ".join(f"{k} {raw.get(k)!r}" for k in ("user_id", "item_id") if not _missing(raw.get(k)))
            raise StoreError("event", index, field, problem, who)

        for f in EVENT_FIELDS:
            if f not in raw:
                fail(f, "missing field")
        user = _text(raw["user_id"], "user_id", fail, True)
        item = _text(raw["item_id"], "item_id", fail, True)
        act = raw["action"]
        if _missing(act):
            fail("action", "missing")
        if not isinstance(act, str):
            fail("action", f"wrong type {type(act).__name__} ({act!r}); expected an action name")
        try:
            action = act.value if isinstance(act, Action) else parse_action(act).value
        except ValueError as e:
            fail("action", str(e))
        ts = _number(raw["timestamp"], "timestamp", fail, True)
        request_id = _text(raw.get("request_id"), "request_id", fail, False)
        if known_items is not None and item not in known_items:
            fail("item_id", f"unknown item {item!r}: not in the store's catalog")
        event_id = _text(raw.get("event_id"), "event_id", fail, False)
        rows.append({
            "event_id": event_id or derive_event_id(user, item, action, ts, request_id),
            "user_id": user, "item_id": item, "action": action, "timestamp": ts, "request_id": request_id,
            "value": _number(raw.get("value"), "value", fail, False),
            "session_id": _text(raw.get("session_id"), "session_id", fail, False),
            "event_order": _number(raw.get("order"), "order", fail, False),
        })
    return rows


def impression_rows(impressions: Iterable[Impression | Mapping[str, Any]],
                    known_items: Collection[str] | None = None) -> list[tuple[dict, list[dict]]]:
    """(impression row, its item rows) per impression, or StoreError for the first bad one."""
    out = []
    for index, imp in enumerate(impressions):
        if isinstance(imp, Mapping):
            try:
                imp = Impression.model_validate(imp)
            except ValueError as e:
                raise StoreError("impression", index, None, f"invalid: {e}") from None
        if not isinstance(imp, Impression):
            raise StoreError("impression", index, None,
                             f"wrong type {type(imp).__name__}; expected an Impression or a mapping")

        def fail(field: str, problem: str, imp=imp, index=index):
            raise StoreError("impression", index, field, problem, f"request_id {imp.request_id!r}")

        _text(imp.request_id, "request_id", fail, True)
        _text(imp.user_id, "user_id", fail, True)
        created = _number(imp.timestamp, "timestamp", fail, False)
        n = len(imp.item_ids)
        per_slot = {"scores": imp.scores, "sources": imp.sources, "propensities": imp.propensities}
        for name, values in per_slot.items():
            if values is not None and len(values) != n:
                fail(name, f"{len(values)} values for {n} shown items")
        items = []
        for pos, item in enumerate(imp.item_ids):
            _text(item, f"item_ids[{pos}]", fail, True)
            if known_items is not None and item not in known_items:
                fail(f"item_ids[{pos}]", f"unknown item {item!r}: not in the store's catalog")
            score = _number(imp.scores[pos], f"scores[{pos}]", fail, False) if imp.scores else None
            prop = (_number(imp.propensities[pos], f"propensities[{pos}]", fail, False)
                    if imp.propensities else None)
            if prop is not None and not 0.0 <= prop <= 1.0:
                fail(f"propensities[{pos}]", f"{prop!r} is not a probability")
            source = _text(imp.sources[pos], f"sources[{pos}]", fail, False) if imp.sources else None
            items.append({"request_id": imp.request_id, "position": pos, "item_id": item, "score": score,
                          "source": source, "propensity": prop})
        out.append(({"request_id": imp.request_id, "user_id": imp.user_id, "model_version": imp.model_version,
                     "pipeline": imp.pipeline, "created_at": created}, items))
    return out
