"""Heuristic rewards: attribute events to the impression slots they answer, then score every slot shown.

Works on plain tables, what the store exports: events with the canonical columns (user_id, item_id, action,
timestamp, request_id, value, ...) and impressions (request_id, user_id, item_ids in order, timestamp,
optional per-slot propensities) as a list of `Impression` / dicts or a DataFrame.

    slots = attribute(impressions, events, cfg)   # one row per (request_id, position, item_id) shown
    slots = rewards(slots, cfg)                    # + `reward`: what that slot earned
    lists = impression_rewards(slots, cfg)         # one row per request: its reward, its propensities

docs/rewards.md has the rules and the default weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dragonrec.schema import ACTION_ALIASES, ACTION_MEANING, ACTIONS, POSITIVE_ACTIONS, Action, Impression

# Actions taken on the list itself: an untagged one answers the latest impression that showed the item.
# Every other action (cart, purchase, review, product-page view, favourite) happens downstream, after the
# user left the list, so it belongs to the impression of the engagement that led there (see `attribute`).
LIST_ACTIONS = frozenset({Action.HOVER.value, Action.CLICK.value, Action.SCROLL_PAST.value})

# The order a weight table must keep: (a, op, b), a number standing for itself. purchase > add_to_cart >
# click > hover >= 0 > scroll_past, and remove_from_cart < 0. Breaking it flips the preference pairs.
REWARD_ORDER: tuple[tuple[str | float, str, str | float], ...] = (
    ("purchase", ">", "add_to_cart"), ("add_to_cart", ">", "click"), ("click", ">", "hover"),
    ("hover", ">=", 0.0), (0.0, ">", "scroll_past"), (0.0, ">", "remove_from_cart"),
)
EVENT_REQUIRED = ("user_id", "item_id", "action", "timestamp")
COUNT_COLUMNS = tuple(f"n_{a.value}" for a in ACTIONS)


def _action_name(raw: Any) -> str | None:
    key = str(raw).strip().lower().replace(" ", "_").replace("-", "_")
    action = ACTION_ALIASES.get(key)
    return action.value if action is not None else None


class RewardConfig(BaseModel):
    """How events become rewards. Defaults: ACTION_MEANING's strengths, a one-day window, the deepest step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # action -> reward, any spelling; actions left out keep their ACTION_MEANING strength
    weights: dict[str, float] = Field(default_factory=dict, validate_default=True)
    check_order: Literal["refuse", "warn", "off"] = "refuse"  # weights breaking REWARD_ORDER: error/warn/ok
    rating_midpoint: float = 3.0  # a review with this rating is worth 0
    rating_half_range: float = Field(2.0, gt=0)  # midpoint +/- this is worth +/- weight[review] (3 +/- 2)
    rating_overrides: bool = True  # a rated review sets its slot's reward (explicit beats implicit)
    window_s: float = Field(86400.0, ge=0)  # untagged actions answer impressions/engagements this recent
    combine: Literal["max", "sum"] = "max"  # actions on one slot: largest weight, or distinct ones summed
    sum_cap: float = Field(1.0, gt=0)  # combine="sum" clips a slot's reward to [-sum_cap, sum_cap]
    ignored_weight: float = 0.0  # reward of a slot shown and not acted on at all (scroll_past is an action)
    per_impression: Literal["sum", "mean"] = "sum"  # a list's reward: its slots' rewards summed or averaged

    @field_validator("weights")
    @classmethod
    def _fill_weights(cls, given: dict[str, float]) -> dict[str, float]:
        # Any known spelling ("clicked", "cart") overrides; the resolved table names every action, so a saved
        # config says exactly which weights were used.
        table = {a.value: m.strength for a, m in ACTION_MEANING.items()}
        unknown = [k for k in given if _action_name(k) is None]
        if unknown:
            raise ValueError(f"unknown action(s) in weights: {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(a.value for a in ACTIONS)})")
        table.update({_action_name(k): float(v) for k, v in given.items()})
        return table

    @model_validator(mode="after")
    def _check_order(self) -> RewardConfig:
        if self.check_order == "off":
            return self
        broken = order_violations(self.weights)
        if broken:
            msg = ("reward weights break the order purchase > add_to_cart > click > hover >= 0 > "
                   f"scroll_past, remove_from_cart < 0: {'; '.join(broken)} "
                   "(check_order='warn' or 'off' to allow it)")
            if self.check_order == "refuse":
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        return self


def order_violations(weights: Mapping[str, float]) -> list[str]:
    """The REWARD_ORDER comparisons a weight table fails, as 'add_to_cart (0.7) > click (0.9) fails'."""
    def show(x):
        return f"{x:g}" if isinstance(x, float) else f"{x} ({weights[x]:g})"
    broken = []
    for a, op, b in REWARD_ORDER:
        va = a if isinstance(a, float) else weights[a]
        vb = b if isinstance(b, float) else weights[b]
        if not (va > vb if op == ">" else va >= vb):
            broken.append(f"{show(a)} {op} {show(b)} fails")
    return broken


# ---------------------------------------------------------------- input tables


def _seconds(col: pd.Series, what: str) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(col):
        secs = col.dt.tz_convert("UTC").dt.tz_localize(None) if getattr(col.dt, "tz", None) else col
        return secs.astype("datetime64[ns]").astype("int64").to_numpy() / 1e9
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna().to_numpy() & col.notna().to_numpy()
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: non-numeric timestamp {col.iloc[p]!r} (row {p})")
    return num.to_numpy(dtype=np.float64, na_value=np.nan)


def _optional_ids(col: pd.Series) -> np.ndarray:
    """str ids, None where missing or empty."""
    out = col.astype(object).to_numpy(copy=True)
    missing = pd.isna(out) | (out == "")
    out[~missing] = [str(v) for v in out[~missing]]
    out[missing] = None
    return out


def check_events(events: pd.DataFrame) -> pd.DataFrame:
    """The events table in canonical form, or a ValueError saying what is wrong with it.

    Returns user_id, item_id (str), action (canonical name, any known spelling accepted), timestamp (float
    seconds), request_id (str or None), value (float, NaN if none) and order (tie-break, NaN if none), in the
    input's row order.
    """
    if not isinstance(events, pd.DataFrame):
        raise TypeError(f"events must be a pandas DataFrame, not {type(events).__name__}")
    missing = [c for c in EVENT_REQUIRED if c not in events.columns]
    if missing:
        raise ValueError(f"events: missing column(s) {', '.join(missing)} "
                         f"(have: {', '.join(map(str, events.columns))})")
    for c in EVENT_REQUIRED:
        bad = events[c].isna().to_numpy()
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(f"events: {int(bad.sum())} row(s) without {c} (first: row {first})")
    raw = events["action"]
    names = {u: _action_name(u) for u in pd.unique(raw)}
    unknown = [u for u, n in names.items() if n is None]
    if unknown:
        raise ValueError(f"events: unknown action(s) {', '.join(map(repr, unknown[:10]))} "
                         f"(known: {', '.join(a.value for a in ACTIONS)})")
    n = len(events)
    out = pd.DataFrame({
        "user_id": events["user_id"].astype(str).to_numpy(),
        "item_id": events["item_id"].astype(str).to_numpy(),
        "action": raw.map(names).astype(str).to_numpy(),
        "timestamp": _seconds(events["timestamp"], "events"),
        "request_id": (_optional_ids(events["request_id"]) if "request_id" in events
                       else np.full(n, None, dtype=object)),
        "value": (pd.to_numeric(events["value"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                  if "value" in events else np.full(n, np.nan)),
        "order": (pd.to_numeric(events["order"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                  if "order" in events else np.full(n, np.nan)),
    })
    return out


def _field(x: Any, name: str) -> Any:
    return x.get(name) if isinstance(x, Mapping) else getattr(x, name, None)


def _is_list(x: Any) -> bool:
    return isinstance(x, (list, tuple, np.ndarray, pd.Series))


def explode_impressions(impressions: Iterable[Impression | Mapping] | pd.DataFrame) -> pd.DataFrame:
    """One row per slot shown: request_id, user_id, timestamp (NaN if unknown), position (0 = top), item_id,
    propensity (the logged probability of that slot, NaN if none), model_version and pipeline (None if
    unknown): what an off-policy estimator needs to know about the policy that showed it.

    `impressions`: Impression objects, dicts, or a DataFrame with request_id, user_id, item_ids (a list per
    row, in the order shown) and optionally timestamp, propensities (one number or None per item),
    model_version, pipeline.
    """
    if isinstance(impressions, pd.DataFrame):
        missing = [c for c in ("request_id", "user_id", "item_ids") if c not in impressions.columns]
        if missing:
            raise ValueError(f"impressions: missing column(s) {', '.join(missing)} "
                             f"(have: {', '.join(map(str, impressions.columns))})")
        n = len(impressions)
        cols = {c: (impressions[c].tolist() if c in impressions.columns else [None] * n)
                for c in ("request_id", "user_id", "item_ids", "propensities", "model_version", "pipeline")}
        if "timestamp" in impressions.columns:  # keep its dtype: datetimes stay datetimes
            cols["timestamp"] = impressions["timestamp"].reset_index(drop=True)
    else:
        rows = list(impressions)
        cols = {c: [_field(x, c) for x in rows]
                for c in ("request_id", "user_id", "item_ids", "timestamp", "propensities", "model_version",
                          "pipeline")}
    req = pd.Series(cols["request_id"], dtype=object)
    user = pd.Series(cols["user_id"], dtype=object)
    for name, col in (("request_id", req), ("user_id", user)):
        bad = col.isna().to_numpy()
        if bad.any():
            raise ValueError(f"impressions: row {int(np.flatnonzero(bad)[0])} has no {name}")
    req, user = req.astype(str), user.astype(str)
    dup = req.duplicated().to_numpy()
    if dup.any():
        raise ValueError(f"impressions: request_id {req.iloc[int(np.flatnonzero(dup)[0])]!r} appears twice")
    items = cols["item_ids"]
    for k, shown in enumerate(items):
        if not _is_list(shown):
            raise ValueError(f"impressions: request {req.iloc[k]!r}: item_ids must be a list of item ids, "
                             f"not {type(shown).__name__}")
    lengths = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
    rep = np.repeat(np.arange(len(items)), lengths)
    starts = np.cumsum(lengths) - lengths
    propensity = np.full(int(lengths.sum()), np.nan)
    for k, p in enumerate(cols["propensities"]):
        if p is None or (not _is_list(p) and pd.isna(p)):
            continue
        if not _is_list(p) or len(p) != lengths[k]:
            raise ValueError(f"impressions: request {req.iloc[k]!r}: propensities must be one number per "
                             f"shown item ({lengths[k]})")
        propensity[starts[k]:starts[k] + lengths[k]] = np.asarray(p, dtype=np.float64)
    outside = (propensity < 0) | (propensity > 1)
    if outside.any():
        raise ValueError(f"impressions: request {req.iloc[rep[np.flatnonzero(outside)[0]]]!r}: "
                         "a propensity outside [0, 1]")
    ts_col = cols["timestamp"]
    ts = _seconds(ts_col if isinstance(ts_col, pd.Series) else pd.Series(ts_col), "impressions")
    return pd.DataFrame({
        "request_id": req.to_numpy()[rep],
        "user_id": user.to_numpy()[rep],
        "timestamp": ts[rep],
        "position": np.arange(len(rep)) - starts[rep],
        "item_id": pd.Series(list(chain.from_iterable(items)), dtype=object).astype(str).to_numpy(),
        "propensity": propensity,
        "model_version": _optional_ids(pd.Series(cols["model_version"], dtype=object))[rep],
        "pipeline": _optional_ids(pd.Series(cols["pipeline"], dtype=object))[rep],
    })


# ---------------------------------------------------------------- attribution


def _latest(left: pd.DataFrame, right: pd.DataFrame, right_ts: str, window_s: float) -> pd.DataFrame:
    """For each left row (event, user_id, item_id, timestamp): the slot of the right row (user_id, item_id,
    right_ts, slot) of the same user and item with the latest right_ts in [timestamp - window_s, timestamp],
    -1 if none."""
    if len(left) == 0 or len(right) == 0:
        return pd.DataFrame({"event": left["event"].to_numpy(), "slot": np.full(len(left), -1, np.int64)})
    m = pd.merge_asof(left.sort_values("timestamp", kind="stable"),
                      right.sort_values(right_ts, kind="stable"), left_on="timestamp", right_on=right_ts,
                      by=["user_id", "item_id"], direction="backward", tolerance=float(window_s),
                      allow_exact_matches=True)
    slot = m["slot"].fillna(-1).to_numpy(dtype=np.int64)
    return pd.DataFrame({"event": m["event"].to_numpy(), "slot": slot})


def _attribute(slots: pd.DataFrame, ev: pd.DataFrame, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """[n_events] slot row each event answers (-1: none), and how: 'request_id', 'time' or 'chain'."""
    n = len(ev)
    slot_of = np.full(n, -1, dtype=np.int64)
    how = np.full(n, None, dtype=object)
    # An item listed twice in one impression: the first (highest) slot takes the answers.
    keys = slots[["request_id", "user_id", "item_id", "timestamp"]].assign(slot=np.arange(len(slots)))
    keys = keys.drop_duplicates(["request_id", "user_id", "item_id"])
    base = ev[["user_id", "item_id", "timestamp"]].assign(event=np.arange(n))

    # 1. The event names its impression (and that impression showed this item to this user): trust it,
    # whenever it happened.
    has_id = ev["request_id"].notna().to_numpy()
    tagged = base[has_id].assign(request_id=ev["request_id"].dropna().astype(str))
    on = ["request_id", "user_id", "item_id"]
    hit = tagged.merge(keys[[*on, "slot"]], on=on)
    slot_of[hit["event"].to_numpy()] = hit["slot"].to_numpy()
    how[hit["event"].to_numpy()] = "request_id"

    shown = keys.loc[keys["timestamp"].notna(), ["user_id", "item_id", "timestamp", "slot"]]
    shown = shown.rename(columns={"timestamp": "shown_ts"})
    acts = ev["action"].to_numpy()
    on_list = np.isin(acts, list(LIST_ACTIONS))

    # 2. Untagged actions on the list: the latest impression that showed the item within the window before.
    todo = base[(slot_of < 0) & on_list]
    m = _latest(todo, shown, "shown_ts", window_s)
    found = m[m["slot"] >= 0]
    slot_of[found["event"].to_numpy()] = found["slot"].to_numpy()
    how[found["event"].to_numpy()] = "time"

    # 3. Untagged downstream actions (a purchase after a click): the impression of the latest attributed
    # positive engagement with the item within the window before, so the list that led to the click gets the
    # purchase even when the item was shown again since; failing that, the latest impression, as in 2.
    # Anchors come from steps 1-2 only, so this is one merge, not a chain walked event by event.
    is_anchor = (slot_of >= 0) & np.isin(acts, list(POSITIVE_ACTIONS))
    anchors = base[is_anchor].assign(slot=slot_of[is_anchor]).rename(columns={"timestamp": "anchor_ts"})
    anchors = anchors[["user_id", "item_id", "anchor_ts", "slot"]]
    todo = base[(slot_of < 0) & ~on_list]
    m = _latest(todo, anchors, "anchor_ts", window_s)
    found = m[m["slot"] >= 0]
    slot_of[found["event"].to_numpy()] = found["slot"].to_numpy()
    how[found["event"].to_numpy()] = "chain"
    m = _latest(base.iloc[m.loc[m["slot"] < 0, "event"].to_numpy()], shown, "shown_ts", window_s)
    found = m[m["slot"] >= 0]
    slot_of[found["event"].to_numpy()] = found["slot"].to_numpy()
    how[found["event"].to_numpy()] = "time"
    return slot_of, how


def attribute_events(impressions: Iterable[Impression | Mapping] | pd.DataFrame, events: pd.DataFrame,
                     cfg: RewardConfig | None = None) -> pd.DataFrame:
    """Every event (canonical form, input order) with the slot it answers: `attributed_request_id`,
    `position` (-1 if none) and `attributed_by` ('request_id', 'time', 'chain'; None: it answers nothing)."""
    cfg = cfg or RewardConfig()
    slots = explode_impressions(impressions)
    ev = check_events(events)
    slot_of, how = _attribute(slots, ev, cfg.window_s)
    hit = slot_of >= 0
    ev["attributed_request_id"] = np.where(hit, slots["request_id"].to_numpy(dtype=object)[slot_of], None)
    ev["position"] = np.where(hit, slots["position"].to_numpy()[slot_of], -1)
    ev["attributed_by"] = how
    return ev


def attribute(impressions: Iterable[Impression | Mapping] | pd.DataFrame, events: pd.DataFrame,
              cfg: RewardConfig | None = None) -> pd.DataFrame:
    """One row per slot shown, (request_id, position, item_id), with the actions that answered it.

    An event answers a slot when (1) its request_id names an impression that showed its item to its user (any
    time), else (2) for hover / click / scroll_past, the latest impression that showed the item to the user
    at most `cfg.window_s` before the event, else (3) for downstream actions (cart, purchase, review, view,
    favourite) the slot of the user's latest positive event on that item attributed by (1) or (2) at most
    `window_s` before (a purchase after a click belongs to the click's impression), falling back to (2).

    Columns: the `explode_impressions` columns, then `actions` (tuple of action names in time order),
    `rating` (the latest review's value, NaN if none) and one count per action (`n_click`, `n_purchase`, ...).
    `attrs["unattributed_events"]` counts the events that answer no slot (history, other pages).
    """
    cfg = cfg or RewardConfig()
    slots = explode_impressions(impressions)
    ev = check_events(events)
    slot_of, _ = _attribute(slots, ev, cfg.window_s)
    hit = ev.assign(slot=slot_of)[slot_of >= 0].sort_values(["slot", "timestamp", "order"], kind="stable")
    codes = pd.Categorical(hit["action"], categories=[a.value for a in ACTIONS]).codes
    counts = np.zeros((len(slots), len(ACTIONS)), dtype=np.int64)
    np.add.at(counts, (hit["slot"].to_numpy(), codes), 1)
    out = slots.copy()
    # `hit` is sorted by slot: each slot's actions are one run of it.
    ends = np.cumsum(np.bincount(hit["slot"].to_numpy(), minlength=len(slots)))
    names = hit["action"].tolist()
    spans = zip((ends - np.diff(ends, prepend=0)).tolist(), ends.tolist(), strict=True)
    out["actions"] = pd.Series([tuple(names[a:b]) for a, b in spans], index=out.index, dtype=object)
    rated = hit[(hit["action"] == Action.REVIEW.value) & hit["value"].notna()]
    last_rating = rated.groupby("slot")["value"].last().reindex(range(len(slots)))
    out["rating"] = last_rating.to_numpy(dtype=np.float64)
    for j, c in enumerate(COUNT_COLUMNS):
        out[c] = counts[:, j]
    out.attrs["unattributed_events"] = int((slot_of < 0).sum())
    return out


# ---------------------------------------------------------------- rewards


def rewards(attributed: pd.DataFrame, cfg: RewardConfig | None = None) -> pd.DataFrame:
    """`attributed` (the output of `attribute`) with `reward` per slot.

    A slot's reward: `cfg.ignored_weight` if nothing answered it; else its actions' weights combined
    (`max`: the largest, i.e. the deepest funnel step; `sum`: the distinct actions' weights summed, clipped to
    +/-`sum_cap`). A rated review is worth weight[review] * clip((rating - midpoint) / half_range, -1, 1), and
    with `rating_overrides` that value is the slot's reward whatever else happened.
    """
    cfg = cfg or RewardConfig()
    missing = [c for c in ("rating", *COUNT_COLUMNS) if c not in attributed.columns]
    if missing:
        raise ValueError(f"rewards: missing column(s) {', '.join(missing)}; pass the output of attribute()")
    counts = attributed[list(COUNT_COLUMNS)].to_numpy(dtype=np.int64)
    rating = attributed["rating"].to_numpy(dtype=np.float64)
    w = np.array([cfg.weights[a.value] for a in ACTIONS])
    w_review = cfg.weights[Action.REVIEW.value]
    scaled = w_review * np.clip((rating - cfg.rating_midpoint) / cfg.rating_half_range, -1.0, 1.0)
    rated = ~np.isnan(rating)
    per_slot = np.broadcast_to(w, counts.shape).copy()
    per_slot[rated, Action.REVIEW.code] = scaled[rated]
    present = counts > 0
    if cfg.combine == "max":
        combined = np.where(present, per_slot, -np.inf).max(axis=1, initial=-np.inf)
    else:
        combined = np.clip(np.where(present, per_slot, 0.0).sum(axis=1), -cfg.sum_cap, cfg.sum_cap)
    reward = np.where(present.any(axis=1), combined, cfg.ignored_weight)
    if cfg.rating_overrides:
        reward = np.where(rated, scaled, reward)
    out = attributed.copy()
    out["reward"] = reward
    return out


def impression_rewards(rewarded: pd.DataFrame, cfg: RewardConfig | None = None) -> pd.DataFrame:
    """One row per request from per-slot rewards: request_id, user_id, timestamp, model_version, pipeline,
    n_shown, n_acted (slots with any action), n_positive (slots with reward > 0), reward
    (`cfg.per_impression`: sum or mean of the slots), and propensities (tuple of the slots' logged
    probabilities in position order, NaN where a slot has none; None when none were logged) for off-policy
    estimators."""
    cfg = cfg or RewardConfig()
    need = ("request_id", "user_id", "timestamp", "position", "reward", "propensity", "model_version",
            "pipeline")
    missing = [c for c in (*need, *COUNT_COLUMNS) if c not in rewarded.columns]
    if missing:
        raise ValueError(f"impression_rewards: missing column(s) {', '.join(missing)}; "
                         "pass the output of rewards()")
    codes, _ = pd.factorize(rewarded["request_id"], sort=False)  # requests in order of appearance
    order = np.lexsort((rewarded["position"].to_numpy(), codes))
    df = rewarded.iloc[order]
    codes = codes[order]
    n = np.bincount(codes)
    first = np.cumsum(n) - n
    reward = df["reward"].to_numpy(dtype=np.float64)
    total = np.bincount(codes, weights=reward)
    acted = df[list(COUNT_COLUMNS)].to_numpy().sum(axis=1) > 0
    out = df.iloc[first][["request_id", "user_id", "timestamp", "model_version", "pipeline"]]
    out = out.reset_index(drop=True)
    out["n_shown"] = n
    out["n_acted"] = np.bincount(codes, weights=acted).astype(np.int64)
    out["n_positive"] = np.bincount(codes, weights=reward > 0).astype(np.int64)
    out["reward"] = total if cfg.per_impression == "sum" else total / n
    prop = df["propensity"].to_numpy(dtype=np.float64)
    logged = np.bincount(codes, weights=~np.isnan(prop)) > 0
    values = prop.tolist()
    out["propensities"] = pd.Series([tuple(values[a:a + k]) if has else None
                                     for a, k, has in zip(first.tolist(), n.tolist(), logged, strict=True)],
                                    dtype=object)
    return out
