"""Complementary products ("goes with"): items bought or carted together, across categories, scored by lift.

    src = ComplementsSource(ComplementsConfig(window_hours=72, min_support=3)).fit(train, catalog)
    src.goes_with(catalog.index_of("B00MONITOR"), n=5)   # (items [m], scores [m]): the product page's slot
    src.candidates(histories, actions, k=50, exclude=histories)   # from the user's recent positive items
    src.explain(a, b)   # {"support", "users_a", "users_b", "baskets", "lift", "score"}
    src.save(path); ComplementsSource.load(path, catalog)

Two items are linked when the same user had both, with mining actions (by default: cart, purchase, review,
favourite), within `window_hours` of each other or in the same session (where the log has session ids), at
most `max_steps` mining events apart. Each user counts once per pair (support = distinct users). A directed
link a -> b is scored by its lift P(b | a) / P(b) (or a lower confidence bound of it), so an item everyone buys
(lift ~ 1) is not a complement of anything; with `cross_category` the two items must lie in different
categories (a monitor's complement is a keyboard, not another monitor).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.candidates.sources import CandidateSource
from dragonrec.data.catalog import Catalog
from dragonrec.schema import ACTION_MEANING, Action, Polarity, parse_action

# Bought-or-carted signals: a view says "considered", which links substitutes as often as complements.
MINING_ACTIONS = (Action.ADD_TO_CART, Action.PURCHASE, Action.REVIEW, Action.FAVORITE)


_STRENGTH = {a.value: m.strength for a, m in ACTION_MEANING.items()}


def _strengths(actions: Sequence[Action]) -> dict[str, float]:
    return {a.value: ACTION_MEANING[a].strength for a in actions}


class ComplementsConfig(BaseModel):
    """How "goes with" links are mined from behaviour and how a user's recent items query them."""

    model_config = ConfigDict(frozen=True)

    action_weights: dict[str, float] = Field(default_factory=lambda: _strengths(MINING_ACTIONS))
    """Actions mined for pairs and the weight of each (default: the schema's strengths of cart, purchase,
    review, favourite). A pair weighs the smaller weight of its two events; add 'view' to mine browsing too."""
    window_hours: float = Field(72.0, ge=0)
    """Two events of one user this close in time form a pair (also when in the same session)."""
    use_sessions: bool = True
    """Also pair events of the same session id, however far apart (where the log has session ids)."""
    max_steps: int = Field(20, ge=1)
    """At most this many mining events apart (bounds the pairs of very active users)."""
    min_support: int = Field(2, ge=1)
    """A link needs at least this many distinct users who had both items."""
    measure: Literal["lift_lcb", "lift", "confidence"] = "lift_lcb"
    """Link score: 'lift' = P(b|a) / P(b); 'lift_lcb' = a Wilson lower bound of P(b|a) over P(b) (rare
    pairs are discounted); 'confidence' = P(b|a) (bestsellers dominate: a baseline, not a default)."""
    z: float = Field(1.64, gt=0)
    """Normal quantile of the lower confidence bound (1.64: one-sided 95%)."""
    min_lift: float = Field(1.0, ge=0)
    """A link's lift must exceed this (1 = more often together than chance)."""
    cross_category: bool = True
    """Keep only links between items of different categories (as cut by `category_level`)."""
    category_level: int | None = Field(1, ge=1)
    """Category path levels compared (after the catalog-wide root, see `strip_common_root`); None = full path."""
    strip_common_root: bool = True
    """Drop leading path levels every categorised item shares ('Beauty > ...' in Amazon Beauty)."""
    uncategorised_links: bool = False
    """With `cross_category`: keep links touching an item without a category (its category is unknown)."""
    max_links: int = Field(200, ge=1)
    """Links kept per item, best first."""
    last_n: int = Field(5, ge=1)
    """How many of the user's latest distinct positive items query the links."""
    decay: float = Field(0.7, gt=0, le=1)
    """Weight of the k-th latest of those items = decay**k (times its action strength)."""


def category_keys(catalog: Catalog, level: int | None = 1, strip_common_root: bool = True) -> np.ndarray:
    """[n] category key per item: the first `level` path levels ('' = no category), after the leading levels
    that every categorised item shares when `strip_common_root`."""
    paths = [[p.strip() for p in c.split(">")] if c else [] for c in catalog.categories]
    root = 0
    if strip_common_root:
        known = [p for p in paths if p]
        while known and all(len(p) > root + 1 and p[root] == known[0][root] for p in known):
            root += 1
    cut = (lambda p: p[root:]) if level is None else (lambda p: p[root:root + level])
    return np.asarray([" > ".join(cut(p)) if p else "" for p in paths], dtype=object)


def _event_weights(train: pd.DataFrame, cfg: ComplementsConfig) -> np.ndarray:
    """[n] mining weight of each event (0 = not mined); action spellings from logs are understood."""
    table = {parse_action(a).value: w for a, w in cfg.action_weights.items()}
    return np.asarray([table.get(a, 0.0) for a in train["action"].to_numpy(dtype=object)], dtype=np.float64)


def _pairs(train: pd.DataFrame, cfg: ComplementsConfig) -> tuple[np.ndarray, ...]:
    """Co-occurring mining events: (user code, item a, item b, pair weight), both directions, a != b."""
    weights = _event_weights(train, cfg)
    ev = train[weights > 0]
    w = weights[weights > 0]
    # the readers sort by user and time; a stable re-sort makes any frame safe
    order = np.lexsort((ev["timestamp"].to_numpy(dtype=np.float64), ev["user_id"].astype(str).to_numpy()))
    ev, w = ev.iloc[order], w[order]
    users = pd.factorize(ev["user_id"].astype(str))[0].astype(np.int64)
    items = ev["item_idx"].to_numpy(dtype=np.int64)
    ts = ev["timestamp"].to_numpy(dtype=np.float64)
    sess = None  # session codes, -1 = no session id
    if cfg.use_sessions and "session_id" in ev and ev["session_id"].notna().any():
        sess = pd.factorize(ev["session_id"])[0].astype(np.int64)
    us, as_, bs, ws = [], [], [], []
    for d in range(1, cfg.max_steps + 1):
        if d >= len(items):
            break
        same_user = users[d:] == users[:-d]
        if not same_user.any():
            break
        near = ts[d:] - ts[:-d] <= cfg.window_hours * 3600
        if sess is not None:
            near |= (sess[d:] == sess[:-d]) & (sess[d:] >= 0)
        ok = same_user & (items[d:] != items[:-d]) & near
        a, b = items[:-d][ok], items[d:][ok]
        pw = np.minimum(w[:-d][ok], w[d:][ok])
        u = users[:-d][ok]
        us += [u, u]
        as_ += [a, b]
        bs += [b, a]
        ws += [pw, pw]
    if not us:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0)
    return np.concatenate(us), np.concatenate(as_), np.concatenate(bs), np.concatenate(ws)


class ComplementsSource(CandidateSource):
    """Items that go with the user's recent items (or with one product: `goes_with`), by mined lift."""

    name = "complements"
    reason = "goes with items you picked"

    def __init__(self, cfg: ComplementsConfig | None = None):
        self.cfg = cfg or ComplementsConfig()
        bad = [a for a in self.cfg.action_weights if ACTION_MEANING[parse_action(a)].polarity is not Polarity.POSITIVE]
        if bad:
            raise ValueError(f"complements are mined from positive actions only, not {bad}")

    # -- mining ---------------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, catalog: Catalog) -> Self:
        super().fit(train, catalog)
        cfg, n = self.cfg, len(catalog)
        self.item_ids = catalog.item_ids.tolist()
        self.categories = category_keys(catalog, cfg.category_level, cfg.strip_common_root)
        u, a, b, w = _pairs(train, cfg)
        # distinct users per directed pair (a user's strongest co-occurrence of the pair counts)
        order = np.lexsort((-w, b, a, u))
        u, a, b, w = u[order], a[order], b[order], w[order]
        first = np.ones(len(u), dtype=bool)
        first[1:] = (u[1:] != u[:-1]) | (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        u, a, b, w = u[first], a[first], b[first], w[first]
        keys, inverse = np.unique(a * n + b, return_inverse=True)
        pairs = (keys // n, keys % n, np.bincount(inverse, minlength=len(keys)),  # a, b, distinct users
                 np.bincount(inverse, weights=w, minlength=len(keys)))  # their summed pair weights
        # per item: distinct users who had it (weighted by their strongest mining action on it)
        iw = _event_weights(train, cfg)
        ev = pd.DataFrame({"user": train["user_id"].to_numpy(), "item": train["item_idx"].to_numpy(dtype=np.int64),
                           "w": iw})[iw > 0]
        per_user_item = ev.groupby(["user", "item"], sort=False)["w"].max()
        item_items = per_user_item.index.get_level_values("item").to_numpy(dtype=np.int64)
        self.item_users = np.bincount(item_items, minlength=n).astype(np.int64)
        item_w = np.bincount(item_items, weights=per_user_item.to_numpy(), minlength=n)
        self.baskets = int(ev["user"].nunique())  # users with any mining event
        # the N of P(b) = n_b / N, weighted like n_b: each user by their strongest mining action
        self._basket_w = float(ev.groupby("user", sort=False)["w"].max().sum())
        self.links, self.support = self._score(*pairs, item_w)
        return self

    def _score(self, a: np.ndarray, b: np.ndarray, s: np.ndarray, wab: np.ndarray, item_w: np.ndarray):
        """(links [n, n] measure, support [n, n] distinct users), both on the kept links only. Per directed
        pair a -> b: `s` distinct users, `wab` their pair weights; `item_w` [n] weighted users per item."""
        cfg, n = self.cfg, self.n_items
        keep = s >= cfg.min_support
        if cfg.cross_category:
            ca, cb = self.categories[a], self.categories[b]
            known = (ca != "") & (cb != "")
            keep &= np.where(known, ca != cb, cfg.uncategorised_links)
        a, b, s, wab = a[keep], b[keep], s[keep], wab[keep]
        N = max(self._basket_w, 1e-12)
        na, nb = np.maximum(item_w[a], 1e-12), np.maximum(item_w[b], 1e-12)
        conf = np.clip(wab / na, 0.0, 1.0)  # P(b | a)
        p_b = nb / N
        lift = conf / p_b
        if cfg.measure == "lift":
            value = lift
        elif cfg.measure == "confidence":
            value = conf
        else:  # Wilson score lower bound of P(b | a) with n_a trials, over P(b)
            z2 = cfg.z ** 2
            centre = conf + z2 / (2 * na)
            spread = cfg.z * np.sqrt(conf * (1 - conf) / na + z2 / (4 * na ** 2))
            value = np.maximum(centre - spread, 0.0) / (1 + z2 / na) / p_b
        keep = (lift > cfg.min_lift) & (value > 0)
        a, b, s, value = a[keep], b[keep], s[keep], value[keep]
        # the best max_links per anchor
        order = np.lexsort((b, -value, a))
        a, b, s, value = a[order], b[order], s[order], value[order]
        starts = np.searchsorted(a, a, side="left")
        top = np.arange(len(a)) - starts < cfg.max_links
        a, b, s, value = a[top], b[top], s[top], value[top]
        links = sp.csr_matrix((value.astype(np.float32), (a, b)), shape=(n, n))
        sup = sp.csr_matrix((s.astype(np.float32), (a, b)), shape=(n, n))
        return links, sup

    # -- serving -------------------------------------------------------------------------------------------
    def goes_with(self, item_idx: int, n: int = 10, exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The "goes with this" slot of a product page: (items [m], scores [m]), best first, m <= n."""
        row = self.links.getrow(int(item_idx))
        items, vals = row.indices.astype(np.int64), row.data.astype(np.float32)
        if exclude is not None and len(exclude):
            keep = ~np.isin(items, np.asarray(exclude, dtype=np.int64))
            items, vals = items[keep], vals[keep]
        order = np.lexsort((items, -vals))[:n]
        return items[order], vals[order]

    def query(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> sp.csr_matrix:
        """[B, n] weights of each user's latest `last_n` distinct positive items: strength x decay**k."""
        cfg = self.cfg
        rows, cols, vals = [], [], []
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)
            acts = np.asarray(actions[r], dtype=object) if actions is not None and actions[r] is not None \
                else np.full(len(h), Action.PURCHASE.value, dtype=object)
            strength = np.asarray([_STRENGTH.get(x) if x in _STRENGTH else ACTION_MEANING[parse_action(x)].strength
                                   for x in acts], dtype=np.float64)
            seen: dict[int, float] = {}
            for i in range(len(h) - 1, -1, -1):  # newest first; an item's latest positive event counts
                if strength[i] > 0 and 0 <= h[i] < self.n_items and int(h[i]) not in seen:
                    seen[int(h[i])] = strength[i] * cfg.decay ** len(seen)
                    if len(seen) == cfg.last_n:
                        break
            rows += [r] * len(seen)
            cols += list(seen)
            vals += list(seen.values())
        return sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), self.n_items), dtype=np.float32)

    def scores(self, histories, actions=None, preferences=None) -> np.ndarray:
        """Sum over the user's recent items of (weight x link score); -inf where no recent item links."""
        q = self.query(histories, actions)
        out = (q @ self.links).toarray().astype(np.float32)
        reached = (q @ (self.links > 0).astype(np.float32)).toarray() > 0
        out[~reached] = -np.inf
        return out

    def explain(self, a: int, b: int) -> dict:
        """Why a -> b is (or is not) a link: distinct users with both (0 unless kept) and with each, baskets,
        the plain lift support * baskets / (users_a * users_b), the link score and both categories."""
        sup = float(self.support[a, b])
        ua, ub = int(self.item_users[a]), int(self.item_users[b])
        return {"support": int(sup), "users_a": ua, "users_b": ub, "baskets": self.baskets,
                "lift": sup * self.baskets / (ua * ub) if sup and ua and ub else 0.0,  # unweighted
                "score": float(self.links[a, b]), "category_a": self.categories[a], "category_b": self.categories[b]}

    # -- catalog changes, persistence ----------------------------------------------------------------------
    def update_catalog(self, catalog: Catalog) -> dict[str, int]:
        """Items keep their links (by id); new items have none until a refit, gone items lose theirs."""
        new_ids = catalog.item_ids.tolist()
        pos = {i: j for j, i in enumerate(new_ids)}
        old_to_new = np.asarray([pos.get(i, -1) for i in self.item_ids], dtype=np.int64)
        n = len(new_ids)

        def remap(m: sp.csr_matrix) -> sp.csr_matrix:
            c = m.tocoo()
            r, k = old_to_new[c.row], old_to_new[c.col]
            ok = (r >= 0) & (k >= 0)
            return sp.csr_matrix((c.data[ok], (r[ok], k[ok])), shape=(n, n))

        def remap_vec(v: np.ndarray) -> np.ndarray:
            out = np.zeros(n, dtype=v.dtype)
            ok = old_to_new >= 0
            out[old_to_new[ok]] = v[ok]
            return out

        self.links, self.support = remap(self.links), remap(self.support)
        self.item_users = remap_vec(self.item_users)
        self.categories = category_keys(catalog, self.cfg.category_level, self.cfg.strip_common_root)
        self.item_ids, self.n_items = new_ids, n
        return {}

    def save(self, path: str | Path) -> None:
        """The links, their support, per-item counts, the item ids and the config."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sp.save_npz(path / "links.npz", self.links)
        sp.save_npz(path / "support.npz", self.support)
        np.savez(path / "items.npz", item_users=self.item_users, item_ids=np.asarray(self.item_ids, dtype=str))
        (path / "complements.json").write_text(json.dumps({"config": self.cfg.model_dump(),
                                                           "baskets": self.baskets}, indent=1))

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> Self:
        """A saved source for `catalog` (the one it was fitted on; else call `update_catalog` after)."""
        path = Path(path)
        meta = json.loads((path / "complements.json").read_text())
        self = cls(ComplementsConfig.model_validate(meta["config"]))
        arrays = np.load(path / "items.npz")
        self.item_ids = arrays["item_ids"].tolist()
        if self.item_ids != catalog.item_ids.tolist():
            raise ValueError(f"{path}: saved for another catalog ({len(self.item_ids)} items); "
                             "load with that catalog, then update_catalog(new)")
        self.n_items, self.baskets = len(catalog), int(meta["baskets"])
        self.links = sp.load_npz(path / "links.npz").tocsr()
        self.support = sp.load_npz(path / "support.npz").tocsr()
        self.item_users = arrays["item_users"]
        self.categories = category_keys(catalog, self.cfg.category_level, self.cfg.strip_common_root)
        return self


__all__ = ["MINING_ACTIONS", "ComplementsConfig", "ComplementsSource", "category_keys"]
