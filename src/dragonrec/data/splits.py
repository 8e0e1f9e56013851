"""Chronological splits: leave-one-out by time, a global time split, cold-user and cold-item slices.

An evaluation case is (user, history, target): the history is every event of the user before the target,
in time order (negative and neutral events included, with their actions); the target is a catalog index and
always a positive event (`dragonrec.schema.ACTION_MEANING`): a scroll-past is never what we ask a model to
predict. Training events never include a validation or test target, nor anything after the validation target.

Same-timestamp order: some logs (Amazon 5-core) order same-day events by item id, an artefact a model can
learn. `shuffle_ties` reorders every run of same-timestamp events of a user with a seed, before splitting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dragonrec.schema import positive_mask


@dataclass
class EvalCases:
    """Evaluation cases, aligned by position."""

    user_ids: np.ndarray  # [n] str
    histories: list[np.ndarray]  # n arrays of catalog indices, oldest first
    actions: list[np.ndarray]  # n arrays of action names, aligned with histories
    targets: np.ndarray  # [n] catalog index
    target_actions: np.ndarray | None = None  # [n] action name of each target event, where known
    target_times: np.ndarray | None = None  # [n] target timestamp (seconds), where known
    previous_times: np.ndarray | None = None  # [n] timestamp of the event just before the target (NaN: none)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, mask_or_idx: np.ndarray) -> EvalCases:
        idx = np.flatnonzero(mask_or_idx) if np.asarray(mask_or_idx).dtype == bool else np.asarray(mask_or_idx)
        def pick(a):
            return None if a is None else a[idx]

        return EvalCases(self.user_ids[idx], [self.histories[i] for i in idx], [self.actions[i] for i in idx],
                         self.targets[idx], pick(self.target_actions), pick(self.target_times),
                         pick(self.previous_times))

    def as_events(self, catalog_ids: np.ndarray) -> pd.DataFrame:
        """The target events as canonical event rows (timestamps unknown: NaN), e.g. to train on them."""
        actions = self.target_actions if self.target_actions is not None else np.full(len(self), "view", dtype=object)
        ts = self.target_times if self.target_times is not None else np.full(len(self), np.nan)
        return pd.DataFrame({"user_id": self.user_ids, "item_id": np.asarray(catalog_ids, dtype=object)[self.targets],
                             "action": actions, "timestamp": ts, "request_id": None, "value": np.nan,
                             "session_id": None, "order": np.nan, "item_idx": self.targets})


@dataclass
class Split:
    """Training events (canonical event columns) and validation/test cases, plus named slices of the test."""

    name: str
    train: pd.DataFrame
    valid: EvalCases
    test: EvalCases
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # slice name -> mask over test cases
    valid_slices: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _user_groups(events: pd.DataFrame):
    """(user ids, start offsets, lengths) of events already sorted by user and time."""
    users = events["user_id"].to_numpy()
    change = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [len(users)]]))
    return users[starts], starts, lengths


def _check_sorted(events: pd.DataFrame) -> None:
    u = events["user_id"].to_numpy()
    if len(u) > 1 and not (u[1:] >= u[:-1]).all():
        raise ValueError("events must be sorted by user_id, timestamp, order (as the readers return them)")


class _CaseBuilder:
    """Collects cases from (user, history slice, target row) of one sorted event table."""

    def __init__(self, events: pd.DataFrame):
        self.items = events["item_idx"].to_numpy(dtype=np.int64)
        self.actions = events["action"].to_numpy(dtype=object)
        self.ts = events["timestamp"].to_numpy(dtype=np.float64)
        self.rows: list[tuple[str, int, int]] = []  # (user, first row of the user, target row)

    def add(self, user: str, start: int, target: int) -> None:
        self.rows.append((user, start, target))

    def build(self) -> EvalCases:
        users = np.asarray([u for u, _, _ in self.rows], dtype=object)
        hist = [self.items[s:t] for _, s, t in self.rows]
        acts = [self.actions[s:t] for _, s, t in self.rows]
        tgt = np.asarray([t for _, _, t in self.rows], dtype=np.int64)
        prev = np.asarray([self.ts[t - 1] if t > s else np.nan for _, s, t in self.rows], dtype=np.float64)
        return EvalCases(users, hist, acts, self.items[tgt], self.actions[tgt], self.ts[tgt], prev)


def leave_one_out(events: pd.DataFrame, min_positives: int = 3) -> Split:
    """Per user: the last positive event = test target, the positive event before it = validation target;
    training = every event before the validation target.

    The test history includes the validation event (and any event between the two). Users with fewer than
    `min_positives` positive events only train.
    """
    _check_sorted(events)
    users, starts, lengths = _user_groups(events)
    positive = positive_mask(events["action"].to_numpy(dtype=object))
    train_mask = np.ones(len(events), dtype=bool)
    valid, test = _CaseBuilder(events), _CaseBuilder(events)
    train_only = after = 0
    for user, s, n in zip(users, starts, lengths):
        pos = s + np.flatnonzero(positive[s:s + n])
        if len(pos) < min_positives:
            train_only += 1
            continue
        v, t = int(pos[-2]), int(pos[-1])
        train_mask[v:s + n] = False
        valid.add(user, s, v)
        test.add(user, s, t)
        after += s + n - 1 - t
    split = Split("leave-one-out", events[train_mask].reset_index(drop=True), valid.build(), test.build())
    split.info = {"train_only_users": train_only, "events_after_test_target": after}
    _add_slices(split)
    return split


def time_split(events: pd.DataFrame, valid_frac: float = 0.1, test_frac: float = 0.2) -> Split:
    """A global time split: training before t_valid, validation in [t_valid, t_test), test from t_test.

    Each user with a positive event in a window and at least one event before it yields one case: the user's
    first positive event in the window is the target and every earlier event is the history (users unseen
    before are the cold-start problem, not this split's).
    """
    _check_sorted(events)
    ts = events["timestamp"].to_numpy(dtype=np.float64)
    t_valid, t_test = np.quantile(ts, [1 - valid_frac - test_frac, 1 - test_frac])
    positive = positive_mask(events["action"].to_numpy(dtype=object))
    users, starts, lengths = _user_groups(events)

    def window(lo: float, hi: float) -> EvalCases:
        cases = _CaseBuilder(events)
        for user, s, n in zip(users, starts, lengths):
            inside = np.flatnonzero((ts[s:s + n] >= lo) & (ts[s:s + n] < hi) & positive[s:s + n])
            if len(inside) == 0 or inside[0] == 0:
                continue
            cases.add(user, s, s + int(inside[0]))
        return cases.build()

    split = Split("time", events[ts < t_valid].reset_index(drop=True), window(t_valid, t_test),
                  window(t_test, np.inf))
    split.info = {"t_valid": float(t_valid), "t_test": float(t_test)}
    _add_slices(split)
    return split


def shuffle_ties(events: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The events with every run of same-user, same-timestamp events in a seeded random order (`order`
    renumbered): removes an order artefact such as Amazon's ascending-ASIN same-day order, in training and
    evaluation alike. Events must be sorted by user and time."""
    _check_sorted(events)
    rng = np.random.default_rng(seed)
    key = rng.random(len(events))
    out = events.assign(_tie=key).sort_values(["user_id", "timestamp", "_tie"], kind="stable")
    out = out.drop(columns="_tie").reset_index(drop=True)
    out["order"] = out.groupby("user_id").cumcount().astype(np.float64)
    return out


def same_day_mask(cases: EvalCases, day_seconds: float = 86400.0) -> np.ndarray:
    """Cases whose target falls on the same (UTC) day as the event right before it: where within-day order
    decides the answer."""
    if cases.target_times is None or cases.previous_times is None:
        return np.zeros(len(cases), dtype=bool)
    prev = cases.previous_times
    ok = np.isfinite(prev)
    out = np.zeros(len(cases), dtype=bool)
    out[ok] = np.floor(cases.target_times[ok] / day_seconds) == np.floor(prev[ok] / day_seconds)
    return out


def cold_user_mask(cases: EvalCases, train: pd.DataFrame, share: float = 0.2) -> np.ndarray:
    """Cases whose user has the fewest training events: the largest count threshold c such that at most
    `share` of cases have <= c training events (at least the smallest count, even if it covers more)."""
    counts = train["user_id"].value_counts()
    per_case = counts.reindex(cases.user_ids).fillna(0).to_numpy()
    if len(per_case) == 0:
        return np.zeros(0, dtype=bool)
    values = np.unique(per_case)
    cum_share = np.array([(per_case <= v).mean() for v in values])
    ok = values[cum_share <= share]
    threshold = ok.max() if len(ok) else values[0]
    return per_case <= threshold


def _add_slices(split: Split) -> None:
    split.slices["cold_user"] = cold_user_mask(split.test, split.train)
    split.valid_slices["cold_user"] = cold_user_mask(split.valid, split.train)
    split.slices["same_day"] = same_day_mask(split.test)
    split.valid_slices["same_day"] = same_day_mask(split.valid)


def cold_item_split(events: pd.DataFrame, frac: float = 0.05, seed: int = 0) -> Split:
    """Leave-one-out with about `frac` of items held out of training entirely (as in TIGER).

    Training loses every event of a held-out item; histories keep them (a text-aware model may use them).
    The `cold_item` slice marks test cases whose target is held out; validation keeps only warm targets.
    """
    base = leave_one_out(events)
    all_items = np.unique(events["item_idx"].to_numpy()[positive_mask(events["action"].to_numpy(dtype=object))])
    rng = np.random.default_rng(seed)
    cold = rng.choice(all_items, size=max(1, round(frac * len(all_items))), replace=False)
    is_cold = np.zeros(int(events["item_idx"].max()) + 1, dtype=bool)
    is_cold[cold] = True
    train = base.train[~is_cold[base.train["item_idx"].to_numpy()]].reset_index(drop=True)
    valid = base.valid.subset(~is_cold[base.valid.targets])
    split = Split("cold-item", train, valid, base.test)
    split.slices["cold_item"] = is_cold[base.test.targets]
    split.slices["cold_user"] = cold_user_mask(split.test, train)
    split.slices["same_day"] = same_day_mask(split.test)
    split.valid_slices["cold_user"] = cold_user_mask(valid, train)
    split.valid_slices["same_day"] = same_day_mask(valid)
    split.info = {"cold_items": len(cold), "cold_item_test_cases": int(split.slices["cold_item"].sum())}
    return split
