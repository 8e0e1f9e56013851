"""A learned reward model: P(positive outcome) and the reward of showing an item to a user, from their history.

Examples are one row per item shown: the user's history before it (item ids, actions), the item, the slot
(position, when a list was shown) and what it earned (`reward`, the heuristic of `dragonrec.rewards`) with a
binary `label` (a positive outcome). They come from the store's impressions + events, or from a typed log
(REES46, Taobao: views, carts, purchases, no impressions) where every view stands for a shown item:

    ex = examples_from_impressions(impressions, events)            # one row per shown slot
    split = split_event_log(events, by="time")                     # typed log: train / valid / test, no leakage
    model = RewardModel(RewardModelConfig(seed=0)).fit(split.train, catalog, valid=split.valid)
    p = model.predict(split.test)                                  # [n] P(label = 1)
    auc(split.test["label"], p), log_loss(split.test["label"], p)
    model.save("runs/reward_model"); RewardModel.load("runs/reward_model", catalog)

Baselines it is measured against: `PopularityPrior` (the item's smoothed positive rate in training data) and
two heuristics that need no training, `history_reward_scores` (the reward weights of what the user already did
to this item and its category) and `content_similarity_scores` (text similarity to the user's history),
turned into probabilities by a `PlattCalibrator` fit on training data.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy.stats import rankdata
from torch import nn

from dragonrec.data.catalog import Catalog
from dragonrec.embed import Embedder, default_embedder, embed_texts
from dragonrec.preferences import attach_history
from dragonrec.rewards import RewardConfig, attribute, check_events, rewards
from dragonrec.schema import ACTIONS, POSITIVE_ACTIONS, Impression, parse_action
from dragonrec.text import catalog_texts

EXAMPLE_COLUMNS = ("user_id", "timestamp", "item_id", "position", "request_id", "reward", "label", "history",
                   "history_actions")
PREDICT_REQUIRED = ("user_id", "item_id", "history", "history_actions")
FIT_REQUIRED = (*PREDICT_REQUIRED, "label")
CONFIG_FILE = "reward_model.json"
WEIGHTS_FILE = "reward_model.safetensors"
_ACTION_CODE = {a.value: i + 1 for i, a in enumerate(ACTIONS)}  # 0 = padding
_EPS = 1e-7


# ---------------------------------------------------------------- examples


class ExampleConfig(BaseModel):
    """How shown items, their outcomes and the history before them are read from a log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    history_len: int = Field(50, ge=0)  # latest events strictly before the shown time kept as history
    history_actions: Literal["positive", "all"] = "positive"  # history of positive actions only, or every event
    shown_action: str = "view"  # typed logs: the action that stands for "the item was shown"
    outcome_actions: tuple[str, ...] = ("add_to_cart", "purchase")  # typed logs: a later one of these = label 1
    window_s: float | None = Field(None, ge=0)  # typed logs: outcomes count this long after; None: reward cfg's
    impression_label: Literal["positive", "outcome"] = "positive"  # impressions: label 1 = any positive action
    # with reward > 0 ("positive", the `chosen` of preferences.py), or any of outcome_actions ("outcome")

    @field_validator("shown_action")
    @classmethod
    def _one_action(cls, v: str) -> str:
        return parse_action(v).value

    @field_validator("outcome_actions")
    @classmethod
    def _actions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("outcome_actions must name at least one action")
        return tuple(parse_action(a).value for a in v)

    @model_validator(mode="after")
    def _shown_is_no_outcome(self) -> ExampleConfig:
        if self.shown_action in self.outcome_actions:
            raise ValueError(f"shown_action {self.shown_action!r} is also an outcome: every row would label itself")
        return self


def _history_events(ev: pd.DataFrame, cfg: ExampleConfig) -> pd.DataFrame:
    return ev[ev["action"].isin(POSITIVE_ACTIONS)] if cfg.history_actions == "positive" else ev


def examples_from_impressions(impressions: Iterable[Impression | Mapping] | pd.DataFrame, events: pd.DataFrame,
                              reward_cfg: RewardConfig | None = None,
                              cfg: ExampleConfig | None = None) -> pd.DataFrame:
    """One row per shown slot, from the store's impressions and the events table (as `rewards.attribute`).

    Columns: user_id, timestamp (of the impression), item_id, position (0 = top), request_id, reward (what the
    slot earned, `rewards.rewards`), label (1: a positive outcome, see `ExampleConfig.impression_label`),
    propensity, model_version, pipeline, history and history_actions (the user's last `cfg.history_len`
    events strictly before the impression, oldest first: the answers to this list are never its context).
    """
    rcfg = reward_cfg or RewardConfig()
    cfg = cfg or ExampleConfig()
    slots = rewards(attribute(impressions, events, rcfg), rcfg)
    if cfg.impression_label == "positive":
        counts = slots[[f"n_{a}" for a in sorted(POSITIVE_ACTIONS)]].to_numpy().sum(axis=1)
        label = (counts > 0) & (slots["reward"].to_numpy() > 0)
    else:
        label = slots[[f"n_{a}" for a in cfg.outcome_actions]].to_numpy().sum(axis=1) > 0
    out = slots[["user_id", "timestamp", "item_id", "position", "request_id", "reward", "propensity",
                 "model_version", "pipeline"]].copy()
    out["label"] = label.astype(np.int64)
    ev = check_events(events)
    out = attach_history(out, _history_events(ev, cfg), cfg.history_len)
    return out[[*EXAMPLE_COLUMNS, "propensity", "model_version", "pipeline"]].reset_index(drop=True)


def examples_from_events(events: pd.DataFrame, reward_cfg: RewardConfig | None = None,
                         cfg: ExampleConfig | None = None, until: float | None = None) -> pd.DataFrame:
    """One row per `cfg.shown_action` event (a view) of a typed log, in the log's order.

    label = 1 when the same user did one of `cfg.outcome_actions` (cart, purchase) to the same item at most
    `window_s` after the view (the same second included); reward = the deepest step reached in that window
    (RewardConfig weights, `combine` as configured; the view itself counts). History = the user's events
    strictly before the view. `until`: only events before this time exist, for labels, rows and history
    alike (a time split censors training labels at its cut with it). Columns: EXAMPLE_COLUMNS (position -1,
    request_id None).
    """
    rcfg = reward_cfg or RewardConfig()
    cfg = cfg or ExampleConfig()
    window = rcfg.window_s if cfg.window_s is None else cfg.window_s
    ev = check_events(events)
    if until is not None:
        ev = ev[ev["timestamp"].to_numpy() < until].reset_index(drop=True)
    shown = ev.loc[ev["action"].to_numpy() == cfg.shown_action, ["user_id", "item_id", "timestamp"]]
    shown = shown.reset_index(drop=True).assign(row=lambda d: np.arange(len(d)))
    later = shown.merge(ev[["user_id", "item_id", "timestamp", "action"]], on=["user_id", "item_id"],
                        suffixes=("", "_next"))
    dt = later["timestamp_next"].to_numpy() - later["timestamp"].to_numpy()
    later = later[(dt >= 0) & (dt <= window)]  # the view itself is one of them (dt = 0)
    rows = later["row"].to_numpy()
    label = np.zeros(len(shown), dtype=np.int64)
    label[rows[later["action"].isin(cfg.outcome_actions).to_numpy()]] = 1
    weight = later["action"].map(rcfg.weights).to_numpy(dtype=np.float64)
    if rcfg.combine == "max":
        reward = np.full(len(shown), -np.inf)
        np.maximum.at(reward, rows, weight)
    else:
        distinct = later.assign(w=weight).drop_duplicates(["row", "action"])
        reward = np.bincount(distinct["row"].to_numpy(), weights=distinct["w"].to_numpy(), minlength=len(shown))
        reward = np.clip(reward, -rcfg.sum_cap, rcfg.sum_cap)
    out = shown[["user_id", "timestamp", "item_id"]].assign(position=-1, request_id=None, reward=reward,
                                                            label=label)
    out = attach_history(out, _history_events(ev, cfg), cfg.history_len)
    return out[list(EXAMPLE_COLUMNS)]


@dataclass
class ExampleSplit:
    """Train / validation / held-out test examples and how they were cut."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    by: str
    cuts: tuple[float, float] | None = None  # time split: valid starts at cuts[0], test at cuts[1]


def _time_cuts(ts: np.ndarray, valid_frac: float, test_frac: float) -> tuple[float, float]:
    if np.isnan(ts).any():
        raise ValueError("split by time: some examples have no timestamp")
    if len(ts) == 0:
        raise ValueError("split by time: no examples")
    return (float(np.quantile(ts, 1.0 - valid_frac - test_frac)), float(np.quantile(ts, 1.0 - test_frac)))


def _check_fracs(valid_frac: float, test_frac: float) -> None:
    if not (0 <= valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(f"fractions must leave a training part: valid_frac={valid_frac}, test_frac={test_frac}")


def _user_parts(users: pd.Series, valid_frac: float, test_frac: float, seed: int) -> np.ndarray:
    """[n] 0 train, 1 valid, 2 test per row: users shuffled with `seed`, cut by share of users."""
    uniq = np.sort(pd.unique(users.astype(str)))
    order = np.random.default_rng(seed).permutation(len(uniq))
    rank = np.empty(len(uniq), dtype=np.float64)
    rank[order] = (np.arange(len(uniq)) + 0.5) / max(len(uniq), 1)
    part_of_user = np.where(rank < 1 - valid_frac - test_frac, 0, np.where(rank < 1 - test_frac, 1, 2))
    return part_of_user[np.searchsorted(uniq, users.astype(str).to_numpy())]


def split_examples(examples: pd.DataFrame, by: Literal["user", "time"] = "user", valid_frac: float = 0.1,
                   test_frac: float = 0.2, seed: int = 0) -> ExampleSplit:
    """Cut an example table by user (each user in one part; `seed` draws them) or by time (the last
    `test_frac` of shown times is test, the `valid_frac` before it validation).

    Impression examples are leak-free either way: each event answers one slot only, and history ends before
    the impression. Examples of a typed log whose labels look forward (`examples_from_events`) can take a
    training label from after a time cut: split those with `split_event_log`.
    """
    _check_fracs(valid_frac, test_frac)
    if by == "user":
        part = _user_parts(examples["user_id"], valid_frac, test_frac, seed)
        cuts = None
    elif by == "time":
        ts = examples["timestamp"].to_numpy(dtype=np.float64)
        cuts = _time_cuts(ts, valid_frac, test_frac)
        part = np.where(ts < cuts[0], 0, np.where(ts < cuts[1], 1, 2))
    else:
        raise ValueError(f"split by 'user' or 'time', not {by!r}")
    parts = [examples[part == k].reset_index(drop=True) for k in range(3)]
    return ExampleSplit(*parts, by=by, cuts=cuts)


def split_event_log(events: pd.DataFrame, by: Literal["user", "time"] = "time", valid_frac: float = 0.1,
                    test_frac: float = 0.2, seed: int = 0, reward_cfg: RewardConfig | None = None,
                    cfg: ExampleConfig | None = None) -> ExampleSplit:
    """Train / valid / test examples of a typed log, with no test label in training rows or features.

    by="time": cut at quantiles of view times. Training rows are built from the events before the validation
    cut only, validation rows from those before the test cut: a cart after a cut never labels an earlier
    part's view (labels are censored at the cut, as they would be in production). History may reach back
    into earlier parts (features, not labels). by="user": users drawn with `seed`; a user's rows, labels and
    history are all their own, so nothing crosses parts.
    """
    _check_fracs(valid_frac, test_frac)
    cfg = cfg or ExampleConfig()
    if by == "user":
        return split_examples(examples_from_events(events, reward_cfg, cfg), "user", valid_frac, test_frac, seed)
    if by != "time":
        raise ValueError(f"split by 'user' or 'time', not {by!r}")
    ev = check_events(events)
    cuts = _time_cuts(ev.loc[ev["action"] == cfg.shown_action, "timestamp"].to_numpy(), valid_frac, test_frac)
    train = examples_from_events(ev, reward_cfg, cfg, until=cuts[0])
    valid = examples_from_events(ev, reward_cfg, cfg, until=cuts[1])
    valid = valid[valid["timestamp"].to_numpy() >= cuts[0]].reset_index(drop=True)
    test = examples_from_events(ev, reward_cfg, cfg)
    test = test[test["timestamp"].to_numpy() >= cuts[1]].reset_index(drop=True)
    return ExampleSplit(train, valid, test, by="time", cuts=cuts)


# ---------------------------------------------------------------- metrics


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties counting half
    (Mann-Whitney U from average ranks). ValueError when one class is absent."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise ValueError(f"auc: {len(y)} labels but {len(s)} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc needs both classes: {n_pos} positive, {n_neg} negative")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: Any, probs: Any, eps: float = _EPS) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps]) against 0/1 labels."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    if len(y) != len(p):
        raise ValueError(f"log_loss: {len(y)} labels but {len(p)} probabilities")
    if len(y) == 0:
        raise ValueError("log_loss of no examples")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


# ---------------------------------------------------------------- input checks and history arrays


def _check_examples(examples: pd.DataFrame, need: tuple[str, ...], what: str) -> None:
    if not isinstance(examples, pd.DataFrame):
        raise TypeError(f"{what}: examples must be a pandas DataFrame, not {type(examples).__name__}")
    missing = [c for c in need if c not in examples.columns]
    if missing:
        raise ValueError(f"{what}: examples miss column(s) {', '.join(missing)} "
                         f"(have: {', '.join(map(str, examples.columns))}); build them with "
                         "examples_from_impressions or examples_from_events")
    if "label" in need:
        y = pd.to_numeric(examples["label"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what}: label must be 0 or 1, row {p} has {examples['label'].iloc[p]!r}")


def _catalog_rows(catalog: Catalog, ids: np.ndarray, what: str, where: np.ndarray | None = None) -> np.ndarray:
    """Catalog index of each id; ValueError naming the first unknown item and its example row."""
    idx = pd.Index(catalog.item_ids).get_indexer(ids)
    bad = idx < 0
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        row = int(where[p]) if where is not None else p
        raise ValueError(f"unknown item {ids[p]!r} in {what} (example row {row}): not in the catalog "
                         f"({int(bad.sum())} unknown in all)")
    return idx.astype(np.int64)


@dataclass
class _History:
    """Examples as arrays: the shown item and the padded history, most recent last."""

    item: np.ndarray  # [n] catalog index of the shown item
    hist: np.ndarray  # [n, L] catalog index, -1 = padding
    actions: np.ndarray  # [n, L] action code (1 + ACTIONS position), 0 = padding
    position: np.ndarray  # [n] slot position, -1 = unknown

    @property
    def mask(self) -> np.ndarray:
        return self.hist >= 0


def _history_arrays(examples: pd.DataFrame, catalog: Catalog, max_len: int | None = None) -> _History:
    n = len(examples)
    item = _catalog_rows(catalog, examples["item_id"].astype(str).to_numpy(dtype=object), "item_id")
    hists = examples["history"].tolist()
    acts = examples["history_actions"].tolist()
    lengths = np.zeros(n, dtype=np.int64)
    for k, (h, a) in enumerate(zip(hists, acts, strict=True)):
        if h is None or a is None or len(h) != len(a):
            raise ValueError(f"example row {k}: history and history_actions must be lists of the same length")
        lengths[k] = len(h)
    keep = np.minimum(lengths, max_len) if max_len is not None else lengths
    width = max(int(keep.max()) if n else 0, 1)
    flat_ids = np.array([str(x) for h, m in zip(hists, keep) for x in list(h)[len(h) - m:]], dtype=object)
    flat_acts = [str(x) for a, m in zip(acts, keep) for x in list(a)[len(a) - m:]]
    owner = np.repeat(np.arange(n), keep)
    codes = np.fromiter((_ACTION_CODE.get(a, -1) for a in flat_acts), dtype=np.int64, count=len(flat_acts))
    if (codes < 0).any():
        p = int(np.flatnonzero(codes < 0)[0])
        raise ValueError(f"example row {int(owner[p])}: unknown history action {flat_acts[p]!r} "
                         f"(known: {', '.join(a.value for a in ACTIONS)})")
    rows = _catalog_rows(catalog, flat_ids, "history", owner)
    # Right-aligned: the most recent event sits in the last column for every row.
    col = width - np.repeat(keep, keep) + (np.arange(len(owner)) - np.repeat(np.cumsum(keep) - keep, keep))
    hist = np.full((n, width), -1, dtype=np.int64)
    act = np.zeros((n, width), dtype=np.int64)
    hist[owner, col] = rows
    act[owner, col] = codes
    if "position" in examples.columns:
        pos = pd.to_numeric(examples["position"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
    else:
        pos = np.full(n, -1, dtype=np.int64)
    return _History(item, hist, act, pos)


def _categories(catalog: Catalog, column: str) -> np.ndarray:
    """[len(catalog)] category of each item as a str, '' where unknown."""
    if column not in catalog.items.columns:
        if column == "category":
            return np.full(len(catalog), "", dtype=object)
        raise ValueError(f"category column {column!r} is not in the catalog "
                         f"(columns: {', '.join(map(str, catalog.items.columns))})")
    col = catalog.items[column].astype(object)
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                     for v in col.tolist()], dtype=object)


def _action_weights(reward_cfg: RewardConfig) -> np.ndarray:
    """[len(ACTIONS) + 1] reward weight per action code, 0 for padding."""
    return np.array([0.0] + [reward_cfg.weights[a.value] for a in ACTIONS])


def _affinity(h: _History, same: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: events in history matching `same` [n, L], and the largest weight among them (0 if none)."""
    count = same.sum(axis=1)
    w = np.where(same, weights[h.actions], -np.inf).max(axis=1, initial=-np.inf)
    return count, np.where(count > 0, w, 0.0)


def _text_similarity(h: _History, vectors: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per row: max and mean cosine between the shown item's vector and its history's (0 without history)."""
    n = len(h.item)
    best, mean = np.zeros(n), np.zeros(n)
    for s in range(0, n, chunk):
        hi, m = h.hist[s:s + chunk], h.mask[s:s + chunk]
        sims = np.einsum("nld,nd->nl", vectors[np.maximum(hi, 0)], vectors[h.item[s:s + chunk]])
        has = m.any(axis=1)
        best[s:s + chunk] = np.where(has, np.where(m, sims, -np.inf).max(axis=1, initial=-np.inf), 0.0)
        mean[s:s + chunk] = np.where(m, sims, 0.0).sum(axis=1) / np.maximum(m.sum(axis=1), 1)
    return best, mean


# ---------------------------------------------------------------- baselines


class PopularityPrior:
    """P(label) from the shown item's training record alone, the same for every user.

    kind="rate": the item's smoothed positive rate in the training examples, (positives_i + strength * p0) /
    (shown_i + strength), p0 the overall training rate; unseen items get p0. kind="count": how often the item
    was shown in training (log1p), turned into a probability by a `PlattCalibrator` fit on the training rows.
    """

    def __init__(self, strength: float = 10.0, kind: Literal["rate", "count"] = "rate"):
        if strength <= 0:
            raise ValueError(f"strength must be > 0, not {strength}")
        if kind not in ("rate", "count"):
            raise ValueError(f"kind must be 'rate' or 'count', not {kind!r}")
        self.strength, self.kind = strength, kind
        self.rates: dict[str, float] = {}
        self.shown: dict[str, float] = {}
        self.base_rate: float | None = None
        self.calibrator: PlattCalibrator | None = None

    def fit(self, train: pd.DataFrame) -> PopularityPrior:
        _check_examples(train, ("item_id", "label"), "PopularityPrior.fit")
        if not len(train):
            raise ValueError("PopularityPrior.fit: no training examples")
        y = train["label"].to_numpy(dtype=np.float64)
        self.base_rate = float(y.mean())
        g = pd.DataFrame({"item_id": train["item_id"].astype(str).to_numpy(), "y": y}).groupby("item_id")["y"]
        pos, shown = g.sum(), g.size()
        self.rates = ((pos + self.strength * self.base_rate) / (shown + self.strength)).to_dict()
        self.shown = shown.astype(np.float64).to_dict()
        if self.kind == "count":
            self.calibrator = PlattCalibrator().fit(self._log_count(train), y)
        return self

    def _log_count(self, examples: pd.DataFrame) -> np.ndarray:
        return np.log1p(examples["item_id"].astype(str).map(self.shown).fillna(0.0).to_numpy(dtype=np.float64))

    def predict(self, examples: pd.DataFrame) -> np.ndarray:
        """[len(examples)] P(label = 1) (float64)."""
        if self.base_rate is None:
            raise RuntimeError("PopularityPrior.predict before fit")
        _check_examples(examples, ("item_id",), "PopularityPrior.predict")
        if self.kind == "count":
            return self.calibrator.predict(self._log_count(examples))
        ids = examples["item_id"].astype(str)
        return ids.map(self.rates).fillna(self.base_rate).to_numpy(dtype=np.float64)


def history_reward_scores(examples: pd.DataFrame, catalog: Catalog, reward_cfg: RewardConfig | None = None,
                          category_column: str = "category") -> np.ndarray:
    """The reward the user's own history implies for the shown item: the largest RewardConfig weight among
    their history actions on this item, plus half the largest among those on other items of its category.

    A fair heuristic because it is what a hand-tuned system would use (users come back to what they engaged
    with, and to its category; deeper steps weigh more), it sees exactly the model's inputs, and it is not
    fit to any label. 0 for users without such history. Turn it into a probability with `PlattCalibrator`.
    """
    _check_examples(examples, PREDICT_REQUIRED, "history_reward_scores")
    h = _history_arrays(examples, catalog)
    weights = _action_weights(reward_cfg or RewardConfig())
    cats = _categories(catalog, category_column)
    same_item = (h.hist == h.item[:, None]) & h.mask
    cand_cat = cats[h.item]
    same_cat = ((cats[np.maximum(h.hist, 0)] == cand_cat[:, None]) & h.mask & ~same_item
                & (cand_cat != "")[:, None])
    _, w_item = _affinity(h, same_item, weights)
    _, w_cat = _affinity(h, same_cat, weights)
    return w_item + 0.5 * w_cat


def content_similarity_scores(examples: pd.DataFrame, catalog: Catalog, vectors: np.ndarray) -> np.ndarray:
    """The largest cosine similarity between the shown item's text vector and those of the user's history
    items (`vectors`: [len(catalog), d] unit rows, e.g. `embed_catalog`); 0 without history."""
    _check_examples(examples, PREDICT_REQUIRED, "content_similarity_scores")
    if len(vectors) != len(catalog):
        raise ValueError(f"vectors has {len(vectors)} rows, the catalog {len(catalog)} items")
    best, _ = _text_similarity(_history_arrays(examples, catalog), np.asarray(vectors, dtype=np.float32))
    return best


def item_vectors(catalog: Catalog, embedder: Embedder | None = None,
                 cache_dir: str | Path | None = None) -> np.ndarray:
    """[len(catalog), dim] unit text vectors of the items (dragonrec.text template), zero for an item without
    any text (so that text-less items are not all "similar" to each other). What the model reads."""
    embedder = embedder or default_embedder()
    texts = catalog_texts(catalog)
    have = [i for i, t in enumerate(texts) if t]
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    if have:
        out[have] = embed_texts([texts[i] for i in have], embedder, cache_dir)
    return out


class PlattCalibrator:
    """P = sigmoid(a * score + b), fit by Newton's method on training scores and labels (Platt scaling):
    turns a heuristic score into a probability for log-loss without changing its order (AUC)."""

    def __init__(self, l2: float = 1e-4):
        self.l2 = l2
        self.a, self.b = 0.0, 0.0

    def fit(self, scores: Any, labels: Any, steps: int = 50) -> PlattCalibrator:
        x = np.asarray(scores, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        mu, sd = x.mean(), x.std() or 1.0
        z = np.stack([(x - mu) / sd, np.ones_like(x)], axis=1)
        rate = np.clip(y.mean(), _EPS, 1 - _EPS)
        theta = np.array([0.0, np.log(rate / (1 - rate))])
        for _ in range(steps):
            p = 1 / (1 + np.exp(-z @ theta))
            grad = z.T @ (p - y) + self.l2 * theta
            hess = (z * (p * (1 - p))[:, None]).T @ z + self.l2 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            theta -= step
            if np.abs(step).max() < 1e-10:
                break
        self.a, self.b = theta[0] / sd, theta[1] - theta[0] * mu / sd
        return self

    def predict(self, scores: Any) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.a * np.asarray(scores, dtype=np.float64) + self.b)))


# ---------------------------------------------------------------- the model


class RewardModelConfig(BaseModel):
    """The learned reward model: sizes, features and training. Defaults train in about a minute on 1 core."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(32, ge=1)  # width of item, category, action and position embeddings
    hidden: int = Field(64, ge=1)  # width of the MLP head
    dropout: float = Field(0.3, ge=0, lt=1)  # on the head's hidden layer
    max_history: int = Field(20, ge=1)  # the latest history events the model reads
    max_position: int = Field(20, ge=1)  # positions from here on share one embedding
    use_ids: bool = True  # learned item id embeddings (items seen at least min_item_count times in training)
    use_text: bool = True  # projected sentence embeddings of item text (dragonrec.text template)
    min_item_count: int = Field(2, ge=1)  # rarer training items share the unknown-item embedding
    category_column: str = "category"  # catalog column whose values get learned embeddings and counts
    prior_strength: float = Field(10.0, gt=0)  # smoothing of the positive-rate features toward the base rate
    n_folds: int = Field(5, ge=2)  # training rows see rate features computed out of fold (other users)
    reward_loss_weight: float = Field(0.5, ge=0)  # weight of the reward regression next to the label's BCE
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)  # AdamW; with dropout, what keeps rare ids from memorising labels
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(30, ge=1)
    eval_every: int = Field(50, ge=1)  # training steps between validation checks (and after the last step)
    patience: int = Field(5, ge=1)  # checks without a better validation log-loss before stopping
    valid_frac: float = Field(0.1, gt=0, lt=1)  # share of training users held out when fit gets no valid
    max_seconds: float | None = Field(None, gt=0)  # stop training after this long (best epoch kept)
    seed: int = 0
    embedding_cache_dir: str | None = None  # where item text vectors are cached (None: not cached)
    reward: RewardConfig = Field(default_factory=RewardConfig)  # action weights of the history features


DENSE_FEATURES = ("log_item_shown", "log_item_positive", "item_rate_logit", "log_category_shown",
                  "category_rate_logit", "log_same_item", "same_item_weight", "log_same_category",
                  "same_category_weight", "text_sim_max", "text_sim_mean", "log_history_len")


class _Net(nn.Module):
    """Shown item (id + category + text) vs the user's history (same, + action), DIN-style attention pooling,
    and an MLP head over both, their product, the position and the dense features -> (logit, reward)."""

    def __init__(self, cfg: RewardModelConfig, n_item_rows: int, n_categories: int, text_dim: int,
                 n_dense: int):
        super().__init__()
        d = cfg.dim
        self.item = nn.Embedding(n_item_rows + 1, d) if cfg.use_ids else None  # row 0: unknown item
        self.category = nn.Embedding(n_categories + 1, d)  # row 0: unknown category
        self.text = nn.Linear(text_dim, d, bias=False) if text_dim else None
        self.action = nn.Embedding(len(ACTIONS) + 1, d)
        self.position = nn.Embedding(cfg.max_position + 1, d)  # row 0: position unknown
        self.query = nn.Linear(d, d)
        self.head = nn.Sequential(nn.Linear(5 * d + n_dense, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.hidden, 2))
        # Catalog-sized lookups, rebuilt from the catalog: not weights, never saved.
        self.register_buffer("item_row", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("category_row", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("text_emb", torch.zeros(0, max(text_dim, 1)), persistent=False)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """[...] catalog indices (-1 = padding, embedded as index 0 and masked by the caller) -> [..., d]."""
        idx = idx.clamp(min=0)
        e = self.category(self.category_row[idx])
        if self.item is not None:
            e = e + self.item(self.item_row[idx])
        if self.text is not None:
            e = e + self.text(self.text_emb[idx])
        return e

    def forward(self, item: torch.Tensor, hist: torch.Tensor, actions: torch.Tensor, position: torch.Tensor,
                dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """item [B], hist/actions [B, L], position [B] (bucket), dense [B, F] -> logit [B], reward [B]."""
        cand = self.embed(item)  # [B, d]
        mask = hist >= 0
        h = self.embed(hist) + self.action(actions)  # [B, L, d]
        scores = torch.einsum("bld,bd->bl", h, self.query(cand)) / cand.shape[-1] ** 0.5
        w = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1) * mask  # rows without history: all 0
        attended = torch.einsum("bl,bld->bd", w, h)
        mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        x = torch.cat([cand, attended, mean, cand * attended, self.position(position), dense], dim=-1)
        out = self.head(x)
        return out[:, 0], out[:, 1]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


class RewardModel:
    """P(positive outcome) and the expected reward of a shown item, learned from examples.

    `fit(train, catalog, valid)` trains with early stopping on `valid` (or on `cfg.valid_frac` of the
    training users), `predict` gives probabilities, `predict_reward` the regressed reward, `save`/`load` keep
    safetensors weights and a JSON config with the training vocabulary and counts. `embedder` makes the item
    text vectors (default: all-MiniLM-L6-v2); load with the same one.
    """

    def __init__(self, cfg: RewardModelConfig | None = None, embedder: Embedder | None = None):
        self.cfg = cfg or RewardModelConfig()
        self.embedder = embedder
        self.catalog: Catalog | None = None
        self.net: _Net | None = None
        self.info: dict[str, Any] = {}

    # ---- the training vocabulary and counts, kept by id so that another catalog maps onto them

    def _build_vocab(self, train: pd.DataFrame, h: _History, catalog: Catalog) -> None:
        ids = catalog.item_ids
        seen = np.bincount(np.concatenate([h.item, h.hist[h.mask]]), minlength=len(catalog))
        self.vocab_items = [str(ids[i]) for i in np.flatnonzero(seen)]
        self.vocab_rows = np.where(seen[seen > 0] >= self.cfg.min_item_count,
                                   np.cumsum(seen[seen > 0] >= self.cfg.min_item_count), 0)
        cats = _categories(catalog, self.cfg.category_column)
        used = cats[np.concatenate([h.item, h.hist[h.mask]])]
        self.vocab_categories = sorted(set(used.tolist()) - {""})
        y = train["label"].to_numpy(dtype=np.float64)
        self.base_rate = float(y.mean())
        self.item_counts = self._counts(ids[h.item], y, self.vocab_items)
        self.category_counts = self._counts(cats[h.item], y, self.vocab_categories)

    @staticmethod
    def _counts(keys: np.ndarray, y: np.ndarray, vocab: list[str]) -> np.ndarray:
        """[len(vocab), 2] (shown, positive) per vocabulary entry."""
        pos = {k: i for i, k in enumerate(vocab)}
        idx = np.fromiter((pos.get(str(k), -1) for k in keys), dtype=np.int64, count=len(keys))
        ok = idx >= 0
        return np.stack([np.bincount(idx[ok], minlength=len(vocab)),
                         np.bincount(idx[ok], weights=y[ok], minlength=len(vocab))], axis=1).astype(np.float64)

    def _attach(self, catalog: Catalog) -> None:
        """Map the catalog onto the training vocabulary and load its text vectors into the network."""
        self.catalog = catalog
        cats = _categories(catalog, self.cfg.category_column)
        self._catalog_cats = cats
        item_pos = pd.Index(self.vocab_items).get_indexer(catalog.item_ids)
        self._item_vocab_pos = item_pos  # [len(catalog)] position in vocab_items, -1 if not in training
        cat_pos = pd.Index(self.vocab_categories).get_indexer(cats) if self.vocab_categories else \
            np.full(len(catalog), -1)
        self._cat_vocab_pos = cat_pos
        item_row = np.where(item_pos >= 0, self.vocab_rows[np.maximum(item_pos, 0)], 0)
        self.net.item_row = torch.as_tensor(item_row, dtype=torch.long)
        self.net.category_row = torch.as_tensor(cat_pos + 1, dtype=torch.long)
        self._vectors = self._text_vectors(catalog) if self.cfg.use_text else None
        if self._vectors is not None:
            self.net.text_emb = torch.as_tensor(self._vectors)

    def _text_vectors(self, catalog: Catalog) -> np.ndarray:
        return item_vectors(catalog, self.embedder, self.cfg.embedding_cache_dir)

    # ---- features

    def _rate_features(self, counts: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shown = np.where(pos >= 0, counts[np.maximum(pos, 0), 0], 0.0) if len(counts) else np.zeros(len(pos))
        positive = np.where(pos >= 0, counts[np.maximum(pos, 0), 1], 0.0) if len(counts) else np.zeros(len(pos))
        a = self.cfg.prior_strength
        rate = (positive + a * self.base_rate) / (shown + a)
        return np.log1p(shown), np.log1p(positive), _logit(rate)

    def _dense(self, h: _History, item_counts: np.ndarray | None = None,
               category_counts: np.ndarray | None = None) -> np.ndarray:
        """[n, len(DENSE_FEATURES)] unscaled: training counts of the item and its category, and what the
        user's history says about it. Counts default to those of the whole training set."""
        ic = self.item_counts if item_counts is None else item_counts
        cc = self.category_counts if category_counts is None else category_counts
        item_shown, item_pos, item_rate = self._rate_features(ic, self._item_vocab_pos[h.item])
        cat_shown, _, cat_rate = self._rate_features(cc, self._cat_vocab_pos[h.item])
        weights = _action_weights(self.cfg.reward)
        cats = self._catalog_cats
        same_item = (h.hist == h.item[:, None]) & h.mask
        cand_cat = cats[h.item]
        same_cat = (cats[np.maximum(h.hist, 0)] == cand_cat[:, None]) & h.mask & (cand_cat != "")[:, None]
        n_item, w_item = _affinity(h, same_item, weights)
        n_cat, w_cat = _affinity(h, same_cat, weights)
        if self._vectors is not None:
            sim_max, sim_mean = _text_similarity(h, self._vectors)
        else:
            sim_max = sim_mean = np.zeros(len(h.item))
        return np.stack([item_shown, item_pos, item_rate, cat_shown, cat_rate, np.log1p(n_item), w_item,
                         np.log1p(n_cat), w_cat, sim_max, sim_mean, np.log1p(h.mask.sum(axis=1))], axis=1)

    def _oof_dense(self, train: pd.DataFrame, h: _History) -> np.ndarray:
        """Dense features of training rows with the rate counts of the other folds of users, scaled to the
        full set: a row's own label never feeds its own features."""
        k = self.cfg.n_folds
        fold = pd.util.hash_array(train["user_id"].astype(str).to_numpy(dtype=object)) % np.uint64(k)
        fold = fold.astype(np.int64)
        y = train["label"].to_numpy(dtype=np.float64)
        item_keys, cat_keys = self.catalog.item_ids[h.item], self._catalog_cats[h.item]
        out = np.zeros((len(train), len(DENSE_FEATURES)))
        for f in range(k):
            rows = fold == f
            if not rows.any():
                continue
            other = ~rows
            scale = len(train) / max(int(other.sum()), 1)
            ic = self._counts(item_keys[other], y[other], self.vocab_items) * scale
            cc = self._counts(cat_keys[other], y[other], self.vocab_categories) * scale
            sub = _History(h.item[rows], h.hist[rows], h.actions[rows], h.position[rows])
            out[rows] = self._dense(sub, ic, cc)
        return out

    def _tensors(self, h: _History, dense: np.ndarray) -> tuple[torch.Tensor, ...]:
        pos = np.where(h.position < 0, 0, np.minimum(h.position, self.cfg.max_position - 1) + 1)
        scaled = (dense - self.dense_mean) / self.dense_std
        return (torch.as_tensor(h.item), torch.as_tensor(h.hist), torch.as_tensor(h.actions),
                torch.as_tensor(pos, dtype=torch.long), torch.as_tensor(scaled, dtype=torch.float32))

    # ---- training and prediction

    def fit(self, examples: pd.DataFrame, catalog: Catalog, valid: pd.DataFrame | None = None) -> RewardModel:
        """Train on `examples` (EXAMPLE_COLUMNS: label required, reward when reward_loss_weight > 0), stopping
        early on the validation log-loss of `valid` (default: `cfg.valid_frac` of the training users)."""
        cfg = self.cfg
        need = (*FIT_REQUIRED, "reward") if cfg.reward_loss_weight > 0 else FIT_REQUIRED
        _check_examples(examples, need, "RewardModel.fit")
        if valid is None:
            part = _user_parts(examples["user_id"], cfg.valid_frac, 0.0, cfg.seed)
            examples, valid = examples[part == 0].reset_index(drop=True), examples[part == 1].reset_index(drop=True)
        _check_examples(valid, need, "RewardModel.fit (valid)")
        if len(examples) == 0 or len(valid) == 0:
            raise ValueError(f"RewardModel.fit: {len(examples)} training and {len(valid)} validation examples")
        if examples["label"].nunique() < 2:
            raise ValueError("RewardModel.fit: training labels are all the same; nothing to learn")
        t0 = time.perf_counter()
        h = _history_arrays(examples, catalog, cfg.max_history)
        hv = _history_arrays(valid, catalog, cfg.max_history)
        self._build_vocab(examples, h, catalog)
        if cfg.use_text and self.embedder is None:
            self.embedder = default_embedder()
        text_dim = self.embedder.dim if cfg.use_text else 0
        torch.manual_seed(cfg.seed)
        self.net = _Net(cfg, int(self.vocab_rows.max(initial=0)), len(self.vocab_categories), text_dim,
                        len(DENSE_FEATURES))
        self._attach(catalog)
        dense = self._oof_dense(examples, h)
        self.dense_mean = dense.mean(axis=0)
        self.dense_std = dense.std(axis=0) + 1e-6
        x_train = self._tensors(h, dense)
        y_train = torch.as_tensor(examples["label"].to_numpy(dtype=np.float32))
        r_train = torch.as_tensor(examples["reward"].to_numpy(dtype=np.float32) if "reward" in examples
                                  else np.zeros(len(examples), dtype=np.float32))
        x_valid = self._tensors(hv, self._dense(hv))
        y_valid = valid["label"].to_numpy(dtype=np.float64)

        with torch.no_grad():  # start from the base rate: early steps learn signal, not calibration
            self.net.head[-1].bias.copy_(torch.tensor([float(_logit(np.array(self.base_rate))),
                                                       float(r_train.mean())]))
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        best, best_state, best_step, history = np.inf, None, 0, []
        step, total, seen, stop = 0, 0.0, 0, False
        for epoch in range(cfg.max_epochs):
            order = torch.randperm(len(y_train), generator=gen)
            for s in range(0, len(order), cfg.batch_size):
                self.net.train()
                b = order[s:s + cfg.batch_size]
                logit, reward = self.net(*(x[b] for x in x_train))
                loss = nn.functional.binary_cross_entropy_with_logits(logit, y_train[b])
                if cfg.reward_loss_weight > 0:
                    loss = loss + cfg.reward_loss_weight * nn.functional.mse_loss(reward, r_train[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step, total, seen = step + 1, total + float(loss.detach()) * len(b), seen + len(b)
                last = epoch == cfg.max_epochs - 1 and s + cfg.batch_size >= len(order)
                if step % cfg.eval_every != 0 and not last:
                    continue
                v = log_loss(y_valid, self._run(x_valid)[0])
                history.append({"step": step, "epoch": epoch, "train_loss": total / seen, "valid_log_loss": v})
                total, seen = 0.0, 0
                if v < best - 1e-6:
                    best, best_step = v, step
                    best_state = copy.deepcopy(self.net.state_dict())
                out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds
                if step - best_step >= cfg.patience * cfg.eval_every or out_of_time:
                    stop = True
                    break
            if stop:
                break
        self.net.load_state_dict(best_state)
        self.info = {"n_train": len(examples), "n_valid": len(valid), "train_positive_rate": self.base_rate,
                     "steps": step, "best_step": best_step, "best_valid_log_loss": best, "evals": history,
                     "seconds": round(time.perf_counter() - t0, 2)}
        return self

    @torch.no_grad()
    def _run(self, x: tuple[torch.Tensor, ...], batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        self.net.eval()
        probs, rewards_ = [], []
        for s in range(0, len(x[0]), batch):
            logit, reward = self.net(*(t[s:s + batch] for t in x))
            probs.append(torch.sigmoid(logit).double().numpy())
            rewards_.append(reward.double().numpy())
        if not probs:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(probs), np.concatenate(rewards_)

    def _predict_both(self, examples: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        if self.net is None:
            raise RuntimeError("RewardModel: fit or load it first")
        _check_examples(examples, PREDICT_REQUIRED, "RewardModel.predict")
        h = _history_arrays(examples, self.catalog, self.cfg.max_history)
        return self._run(self._tensors(h, self._dense(h)))

    def predict(self, examples: pd.DataFrame) -> np.ndarray:
        """[len(examples)] P(label = 1) per example (float64)."""
        return self._predict_both(examples)[0]

    def predict_reward(self, examples: pd.DataFrame) -> np.ndarray:
        """[len(examples)] the regressed reward per example (meaningful when trained with reward_loss_weight
        > 0)."""
        return self._predict_both(examples)[1]

    # ---- persistence

    def save(self, path: str | Path) -> Path:
        """Write `reward_model.safetensors` (weights and training counts) and `reward_model.json` (config,
        training vocabulary, feature scaling, embedder name, fit info) into the folder `path`."""
        from safetensors.torch import save_file

        if self.net is None:
            raise RuntimeError("RewardModel.save: nothing to save, fit it first")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tensors |= {"item_counts": torch.as_tensor(self.item_counts),
                    "category_counts": torch.as_tensor(self.category_counts).reshape(-1, 2),
                    "vocab_rows": torch.as_tensor(self.vocab_rows, dtype=torch.long),
                    "dense_mean": torch.as_tensor(self.dense_mean), "dense_std": torch.as_tensor(self.dense_std)}
        save_file(tensors, str(path / WEIGHTS_FILE))
        meta = {"config": self.cfg.model_dump(mode="json"), "vocab_items": self.vocab_items,
                "vocab_categories": self.vocab_categories, "base_rate": self.base_rate,
                "embedder": self.embedder.name if self.cfg.use_text else None,
                "text_dim": self.embedder.dim if self.cfg.use_text else 0,
                "dense_features": list(DENSE_FEATURES), "info": self.info}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog, embedder: Embedder | None = None) -> RewardModel:
        """A saved model on `catalog` (items it never trained on get the unknown-item embedding and their
        text); `embedder` must be the one it was trained with (default: all-MiniLM-L6-v2)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} + {WEIGHTS_FILE}, not a saved RewardModel")
        meta = json.loads((path / CONFIG_FILE).read_text())
        model = cls(RewardModelConfig(**meta["config"]), embedder)
        if model.cfg.use_text:
            if model.embedder is None:
                model.embedder = default_embedder()
            if model.embedder.name != meta["embedder"] or model.embedder.dim != meta["text_dim"]:
                raise ValueError(f"{path}: trained with embedder {meta['embedder']!r} ({meta['text_dim']}-d), "
                                 f"loaded with {model.embedder.name!r} ({model.embedder.dim}-d)")
        t = load_file(str(path / WEIGHTS_FILE))
        model.vocab_items, model.vocab_categories = meta["vocab_items"], meta["vocab_categories"]
        model.vocab_rows = t["vocab_rows"].numpy()
        model.item_counts, model.category_counts = t["item_counts"].numpy(), t["category_counts"].numpy()
        model.dense_mean, model.dense_std = t["dense_mean"].numpy(), t["dense_std"].numpy()
        model.base_rate, model.info = meta["base_rate"], meta["info"]
        model.net = _Net(model.cfg, int(model.vocab_rows.max(initial=0)), len(model.vocab_categories),
                         meta["text_dim"], len(DENSE_FEATURES))
        model.net.load_state_dict({k.removeprefix("net."): v for k, v in t.items() if k.startswith("net.")})
        model._attach(catalog)
        return model
