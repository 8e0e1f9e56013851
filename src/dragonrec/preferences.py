"""Preference data from rewarded impressions: (chosen, rejected) pairs and one-vs-many groups for DPO.

    slots = rewards(attribute(impressions, events, reward_cfg), reward_cfg)
    pairs = build_pairs(slots, events, cfg)     # one row per (chosen, rejected) of one impression
    groups = build_groups(slots, events, cfg)   # one row per chosen item, every rejected of its impression
    records = to_records(pairs)                 # [{"user_id", "history", "history_actions", "chosen", ...}]

Chosen: a slot with a positive action (ACTION_MEANING) and a reward > 0. Rejected: a slot of the same
impression with a lower reward and, by default, no positive action (ignored, scrolled past, removed from
the cart). The prompt context is the user's history strictly before the impression: the last N events.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.rewards import check_events
from dragonrec.schema import POSITIVE_ACTIONS

# Rewards are sums and clips of float weights: 1.0 - 0.8 is 0.19999999999999996, which must pass a 0.2 bar.
_EPS = 1e-9
RECORD_KEYS = ("request_id", "user_id", "history", "history_actions", "chosen", "rejected", "margin",
               "weight")


class PreferenceConfig(BaseModel):
    """Which slots pair up and how much context each pair carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_margin: float = Field(0.0, ge=0)  # keep pairs whose margin (reward difference) >= this; ties never
    rejected_positives: bool = False  # a positive slot with a lower reward can be rejected too (buy > click)
    weight_by_margin: bool = False  # `weight` = margin (a per-pair loss weight); else 1.0
    history_len: int = Field(50, ge=0)  # latest events before the impression given as context (0 = none)


def _check_rewarded(rewarded: pd.DataFrame) -> pd.DataFrame:
    need = ("request_id", "user_id", "timestamp", "position", "item_id", "reward")
    missing = [c for c in need if c not in rewarded.columns]
    if missing:
        raise ValueError(f"preferences: missing column(s) {', '.join(missing)}; pass the output of rewards()")
    positive_counts = [f"n_{a}" for a in sorted(POSITIVE_ACTIONS) if f"n_{a}" in rewarded.columns]
    if not positive_counts:
        raise ValueError("preferences: no action count columns (n_click, ...); pass the output of rewards()")
    out = rewarded[list(need)].copy()
    out["order"] = np.arange(len(out))  # the input's order of impressions, kept in the output
    out["positive"] = (rewarded[positive_counts].to_numpy().sum(axis=1) > 0) & (out["reward"].to_numpy() > 0)
    return out


def _pair_rows(slots: pd.DataFrame, cfg: PreferenceConfig) -> pd.DataFrame:
    chosen = slots[slots["positive"]]
    pool = slots if cfg.rejected_positives else slots[~slots["positive"]]
    pairs = chosen.merge(pool[["request_id", "position", "item_id", "reward"]], on="request_id",
                         suffixes=("_chosen", "_rejected"))
    pairs["margin"] = pairs["reward_chosen"] - pairs["reward_rejected"]
    keep = ((pairs["margin"] > _EPS) & (pairs["margin"] >= cfg.min_margin - _EPS)
            & (pairs["item_id_chosen"] != pairs["item_id_rejected"]))
    pairs = pairs[keep].sort_values(["order", "position_chosen", "position_rejected"], kind="stable")
    out = pd.DataFrame({
        "request_id": pairs["request_id"].to_numpy(),
        "user_id": pairs["user_id"].to_numpy(),
        "timestamp": pairs["timestamp"].to_numpy(dtype=np.float64),
        "chosen": pairs["item_id_chosen"].to_numpy(),
        "rejected": pairs["item_id_rejected"].to_numpy(),
        "chosen_position": pairs["position_chosen"].to_numpy(),
        "rejected_position": pairs["position_rejected"].to_numpy(),
        "chosen_reward": pairs["reward_chosen"].to_numpy(dtype=np.float64),
        "rejected_reward": pairs["reward_rejected"].to_numpy(dtype=np.float64),
        "margin": pairs["margin"].to_numpy(dtype=np.float64),
    })
    out["weight"] = out["margin"] if cfg.weight_by_margin else 1.0
    return out


def attach_history(df: pd.DataFrame, events: pd.DataFrame, n: int) -> pd.DataFrame:
    """`df` (user_id, timestamp per row) plus `history` and `history_actions`: the item ids and actions of
    the user's last `n` events strictly before that timestamp, oldest first ([] if the timestamp is NaN).
    Rows with the same user and timestamp (the pairs of one impression) share the same two lists."""
    out = df.copy()
    keys = pd.DataFrame({"user_id": out["user_id"].astype(str).to_numpy(),
                         "timestamp": out["timestamp"].to_numpy(dtype=np.float64)})
    key_codes, uniq = _factorize_rows(keys)
    ev = check_events(events).sort_values(["user_id", "timestamp", "order"], kind="stable",
                                          na_position="last")
    ev = ev.reset_index(drop=True).assign(row=np.arange(len(ev)))
    end = np.zeros(len(uniq), dtype=np.int64)  # one past the user's last event before the timestamp
    start = np.zeros(len(uniq), dtype=np.int64)
    known = uniq["timestamp"].notna().to_numpy()
    if n > 0 and len(ev) and known.any():
        q = uniq[known].assign(q=np.flatnonzero(known)).sort_values("timestamp", kind="stable")
        # Strictly before: an event at the impression's own second answers it, it did not lead to it.
        # merge_asof wants the right side in time order; among equal times the highest row (latest) wins.
        right = ev[["user_id", "timestamp", "row"]].sort_values(["timestamp", "row"], kind="stable")
        m = pd.merge_asof(q, right, on="timestamp", by="user_id", direction="backward",
                          allow_exact_matches=False)
        has = m["row"].notna().to_numpy()
        qi = m["q"].to_numpy()[has]
        end[qi] = m["row"].to_numpy()[has].astype(np.int64) + 1
        first_row = ev.groupby("user_id", sort=False)["row"].min()
        block = first_row.reindex(m["user_id"].to_numpy()[has]).to_numpy(dtype=np.int64)
        start[qi] = np.maximum(block, end[qi] - n)
    items, acts = ev["item_id"].tolist(), ev["action"].tolist()
    spans = list(zip(start.tolist(), end.tolist(), strict=True))
    hist = [items[s:e] for s, e in spans]
    hist_acts = [acts[s:e] for s, e in spans]
    out["history"] = pd.Series([hist[k] for k in key_codes], index=out.index, dtype=object)
    out["history_actions"] = pd.Series([hist_acts[k] for k in key_codes], index=out.index, dtype=object)
    return out


def _factorize_rows(keys: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """[n] code of each row's (user_id, timestamp) and the distinct keys, NaN timestamps included."""
    filled = keys.assign(timestamp=keys["timestamp"].fillna(-np.inf))
    codes = filled.groupby(["user_id", "timestamp"], sort=False).ngroup().to_numpy()
    uniq = keys.iloc[pd.Series(np.arange(len(keys))).groupby(codes).first().to_numpy()].reset_index(drop=True)
    return codes, uniq


def build_pairs(rewarded: pd.DataFrame, events: pd.DataFrame,
                cfg: PreferenceConfig | None = None) -> pd.DataFrame:
    """One row per (chosen, rejected) slot pair of one impression, with the history before it.

    `rewarded`: the output of `rewards.rewards`; `events`: the canonical events table (for the history).
    Columns: request_id, user_id, timestamp, chosen, rejected, chosen_position, rejected_position,
    chosen_reward, rejected_reward, margin (> 0, >= cfg.min_margin), weight, history, history_actions.
    An impression with no positive slot, or whose other slots earned as much, gives no pair.
    """
    cfg = cfg or PreferenceConfig()
    pairs = _pair_rows(_check_rewarded(rewarded), cfg)
    return attach_history(pairs, events, cfg.history_len)


def build_groups(rewarded: pd.DataFrame, events: pd.DataFrame,
                 cfg: PreferenceConfig | None = None) -> pd.DataFrame:
    """One row per chosen slot: every rejected slot of its impression at once (multi-negative DPO).

    Columns as `build_pairs`, but rejected, rejected_position, rejected_reward, margin and weight are lists
    aligned with each other, in position order.
    """
    cfg = cfg or PreferenceConfig()
    pairs = _pair_rows(_check_rewarded(rewarded), cfg)
    listed = ("rejected", "rejected_position", "rejected_reward", "margin", "weight")
    keys = ["request_id", "chosen_position"]
    g = pairs.groupby(keys, sort=False)
    groups = g[["user_id", "timestamp", "chosen", "chosen_reward"]].first()
    for c in listed:
        groups[c] = g[c].agg(list)
    groups = groups.reset_index()
    cols = ["request_id", "user_id", "timestamp", "chosen", "rejected", "chosen_position",
            "rejected_position", "chosen_reward", "rejected_reward", "margin", "weight"]
    return attach_history(groups[cols], events, cfg.history_len)


def to_records(prefs: pd.DataFrame) -> list[dict]:
    """Pairs or groups as plain dicts for DPO code: request_id, user_id, history, history_actions, chosen,
    rejected (an id, or a list for groups), margin and weight (a float, or a list aligned with rejected)."""
    missing = [k for k in RECORD_KEYS if k not in prefs.columns]
    if missing:
        raise ValueError(f"to_records: missing column(s) {', '.join(missing)}; "
                         "pass the output of build_pairs or build_groups")

    def plain(v):
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v.item() if isinstance(v, np.generic) else v

    return [{k: plain(v) for k, v in row.items()} for row in prefs[list(RECORD_KEYS)].to_dict("records")]
