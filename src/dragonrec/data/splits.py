"""Chronological splits: leave-one-out by time, a global time split, cold-user and cold-item slices.

An evaluation case is (user, history, target): the history is every event of the user before the target,
in time order; the target is a catalog index. Training events never include a validation or test target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class EvalCases:
    """Evaluation cases, aligned by position."""

    user_ids: np.ndarray  # [n] str
    histories: list[np.ndarray]  # n arrays of catalog indices, oldest first
    actions: list[np.ndarray]  # n arrays of action names, aligned with histories
    targets: np.ndarray  # [n] catalog index
    target_actions: np.ndarray | None = None  # [n] action name of each target event, where known

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, mask_or_idx: np.ndarray) -> EvalCases:
        idx = np.flatnonzero(mask_or_idx) if np.asarray(mask_or_idx).dtype == bool else np.asarray(mask_or_idx)
        return EvalCases(self.user_ids[idx], [self.histories[i] for i in idx], [self.actions[i] for i in idx],
                         self.targets[idx], None if self.target_actions is None else self.target_actions[idx])

    def as_events(self, catalog_ids: np.ndarray) -> pd.DataFrame:
        """The target events as canonical event rows (timestamps unknown: NaN), e.g. to train on them."""
        actions = self.target_actions if self.target_actions is not None else np.full(len(self), "view", dtype=object)
        return pd.DataFrame({"user_id": self.user_ids, "item_id": np.asarray(catalog_ids, dtype=object)[self.targets],
                             "action": actions, "timestamp": np.nan, "request_id": None, "value": np.nan,
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


def leave_one_out(events: pd.DataFrame) -> Split:
    """Per user: last event = test target, second-to-last = validation target, the rest = training.

    The test history includes the validation event. Users with fewer than 3 events only train.
    """
    _check_sorted(events)
    items = events["item_idx"].to_numpy(dtype=np.int64)
    actions = events["action"].to_numpy(dtype=object)
    users, starts, lengths = _user_groups(events)
    train_mask = np.ones(len(events), dtype=bool)
    ev = {"valid": ([], [], [], [], []), "test": ([], [], [], [], [])}
    for user, s, n in zip(users, starts, lengths):
        if n < 3:
            continue
        train_mask[s + n - 2: s + n] = False
        for name, t in (("valid", s + n - 2), ("test", s + n - 1)):
            u, h, a, tg, ta = ev[name]
            u.append(user)
            h.append(items[s:t])
            a.append(actions[s:t])
            tg.append(items[t])
            ta.append(actions[t])

    def cases(name: str) -> EvalCases:
        u, h, a, t, ta = ev[name]
        return EvalCases(np.asarray(u, dtype=object), h, a, np.asarray(t, dtype=np.int64), np.asarray(ta, dtype=object))

    split = Split("leave-one-out", events[train_mask].reset_index(drop=True), cases("valid"), cases("test"))
    split.info = {"train_only_users": int((lengths < 3).sum())}
    _add_cold_user_slices(split)
    return split


def time_split(events: pd.DataFrame, valid_frac: float = 0.1, test_frac: float = 0.2) -> Split:
    """A global time split: training before t_valid, validation in [t_valid, t_test), test from t_test.

    Each user with events in a window and at least one event before it yields one case: the user's first
    event in the window is the target and every earlier event is the history (users unseen before are the
    cold-start problem, not this split's).
    """
    _check_sorted(events)
    ts = events["timestamp"].to_numpy(dtype=np.float64)
    t_valid, t_test = np.quantile(ts, [1 - valid_frac - test_frac, 1 - test_frac])
    items = events["item_idx"].to_numpy(dtype=np.int64)
    actions = events["action"].to_numpy(dtype=object)
    users, starts, lengths = _user_groups(events)

    def window(lo: float, hi: float) -> EvalCases:
        u, h, a, tg, ta = [], [], [], [], []
        for user, s, n in zip(users, starts, lengths):
            t_user = ts[s:s + n]
            inside = np.flatnonzero((t_user >= lo) & (t_user < hi))
            if len(inside) == 0 or inside[0] == 0:
                continue
            t = s + inside[0]
            u.append(user); h.append(items[s:t]); a.append(actions[s:t]); tg.append(items[t]); ta.append(actions[t])
        return EvalCases(np.asarray(u, dtype=object), h, a, np.asarray(tg, dtype=np.int64), np.asarray(ta, dtype=object))

    split = Split("time", events[ts < t_valid].reset_index(drop=True), window(t_valid, t_test),
                  window(t_test, np.inf))
    split.info = {"t_valid": float(t_valid), "t_test": float(t_test)}
    _add_cold_user_slices(split)
    return split


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


def _add_cold_user_slices(split: Split) -> None:
    split.slices["cold_user"] = cold_user_mask(split.test, split.train)
    split.valid_slices["cold_user"] = cold_user_mask(split.valid, split.train)


def cold_item_split(events: pd.DataFrame, frac: float = 0.05, seed: int = 0) -> Split:
    """Leave-one-out with about `frac` of items held out of training entirely (as in TIGER).

    Training loses every event of a held-out item; histories keep them (a text-aware model may use them).
    The `cold_item` slice marks test cases whose target is held out; validation keeps only warm targets.
    """
    base = leave_one_out(events)
    all_items = np.unique(events["item_idx"].to_numpy())
    rng = np.random.default_rng(seed)
    cold = rng.choice(all_items, size=max(1, round(frac * len(all_items))), replace=False)
    is_cold = np.zeros(int(events["item_idx"].max()) + 1, dtype=bool)
    is_cold[cold] = True
    train = base.train[~is_cold[base.train["item_idx"].to_numpy()]].reset_index(drop=True)
    valid = base.valid.subset(~is_cold[base.valid.targets])
    split = Split("cold-item", train, valid, base.test)
    split.slices["cold_item"] = is_cold[base.test.targets]
    split.slices["cold_user"] = cold_user_mask(split.test, train)
    split.valid_slices["cold_user"] = cold_user_mask(valid, train)
    split.info = {"cold_items": len(cold), "cold_item_test_cases": int(split.slices["cold_item"].sum())}
    return split
