"""Counts over training events that several stages share (popularity for baselines, cold start, novelty)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dragonrec.schema import positive_mask


def positives(events: pd.DataFrame) -> pd.DataFrame:
    """The events whose action is positive (`dragonrec.schema.ACTION_MEANING`): what counts as interest."""
    if not len(events) or "action" not in events:
        return events
    return events[positive_mask(events["action"].to_numpy())]


def item_popularity(train: pd.DataFrame, n_items: int, distinct_users: bool = True,
                    half_life_days: float | None = None) -> np.ndarray:
    """[n_items] popularity: positive events only (a scroll-past is not popularity), each user once per item
    by default, optionally time-decayed from the last training event."""
    ev = positives(train)
    ev = ev.drop_duplicates(["user_id", "item_idx"], keep="last") if distinct_users else ev
    weights = None
    if half_life_days is not None and len(ev):
        age_days = (ev["timestamp"].max() - ev["timestamp"].to_numpy()) / 86400.0
        weights = 0.5 ** (age_days / half_life_days)
    return np.bincount(ev["item_idx"].to_numpy(dtype=np.int64), weights=weights, minlength=n_items).astype(np.float64)
