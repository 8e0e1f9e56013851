"""A user simulator grounded in real held-out behaviour: lists in, typed events out.

Each simulated user is a real user of a dataset, cut at a point in time: their **history** is what they did
before it, their **future** the positive events that really came after (for a leave-one-out split: the
test target, or the validation and test targets for models not refitted on validation). Shown a list, the user:

1. examines position p (1-based) with probability `1 / log2(1 + p)` (position-based model; `examination`);
2. on an examined item from their future: clicks it (`p_click_future`), then follows their real funnel on it
   (the deepest real action: a purchase or review goes click -> add_to_cart -> purchase, each step taken with
   `p_follow`); the item leaves the future and joins the history;
3. on an examined item *related* to a remaining future item (among its `related_k` nearest neighbours by
   item-text embedding, or its `related_k` most co-bought items in the training events): hovers
   (`p_hover_related`) and sometimes clicks (`p_click_related`);
4. on any other examined item: rarely hovers or clicks (`p_hover_other`, `p_click_other`);
5. a click on a non-future item goes on like ordinary browsing: add to cart with `p_cart_after_click`, then
   purchase with `p_purchase_after_cart` or remove from cart with `p_remove_after_cart`; these browse-funnel
   rates are fitted on typed logs (`fit_browse_funnel`: REES46 views -> carts -> purchases);
6. an examined item neither hovered nor clicked is scrolled past (the storefront logs exactly that).

A session is several requests: after each list, the user asks again with probability `p_continue` (up to
`max_requests`; the geometric session length is fitted on REES46 sessions by `fit_browse_funnel`), every
event of the list entering their history (so a model that reads actions sees the scroll-pasts). Every draw
comes from a generator seeded by (seed, user id): a run is deterministic for its seed and independent of how
users are batched. Output: `schema.Impression`s and canonical events, which `dragonrec.rewards` scores exactly
as it scores the real storefront's logs.

    sim = Simulator(catalog, split.train, SimulatorConfig(), item_vectors=vectors)
    users = users_from_split(split)                         # history before the test target
    feedback, evaluation = split_users(users, 0.5, seed=0)  # disjoint groups
    log = sim.run(RecommenderPolicy(model), evaluation, seed=1)
    log.summary()   # reward per impression, CTR by position, purchases, future items found

docs/simulator.md documents every parameter and how it was set.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.data.catalog import Catalog
from dragonrec.data.splits import Split
from dragonrec.recommenders.base import Recommender
from dragonrec.rewards import RewardConfig, attribute, impression_rewards, rewards
from dragonrec.schema import Action, Impression, positive_mask


class SimulatorConfig(BaseModel):
    """Every behaviour parameter of the simulated users. Fitted values say where they came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    list_size: int = Field(10, ge=1)  # items shown per request
    examination: Literal["log", "all"] = "log"  # P(examine position p) = 1/log2(1+p), or every slot seen
    # Items from the user's real future (set, not fitted: no public log here records what was shown).
    p_click_future: float = Field(0.8, ge=0, le=1)  # an examined future item is clicked
    p_follow: float = Field(0.9, ge=0, le=1)  # each further real funnel step on it (cart, purchase) is taken
    # Items related to a remaining future item (text neighbours or co-bought): interest without intent.
    related_k: int = Field(20, ge=0)  # neighbours per future item, by each of text and co-occurrence
    p_hover_related: float = Field(0.3, ge=0, le=1)
    p_click_related: float = Field(0.1, ge=0, le=1)
    # Anything else.
    p_hover_other: float = Field(0.03, ge=0, le=1)
    p_click_other: float = Field(0.01, ge=0, le=1)
    # Browsing funnel after a click on a non-future item: fitted on REES46 (fit_browse_funnel; docs/simulator.md).
    p_cart_after_click: float = Field(0.0102, ge=0, le=1)  # (user, item) pairs viewed -> carted
    p_purchase_after_cart: float = Field(0.5528, ge=0, le=1)  # pairs carted -> purchased
    p_remove_after_cart: float = Field(0.05, ge=0, le=1)  # carted -> removed (set: REES46's head has none)
    # Sessions: geometric length, fitted on REES46 (mean views per session -> continuation probability).
    p_continue: float = Field(0.5879, ge=0, lt=1)
    max_requests: int = Field(5, ge=1)
    seconds_between_requests: float = Field(60.0, gt=0)
    seconds_per_slot: float = Field(2.0, gt=0)  # events of slot p happen p * this after the list is shown


@dataclass
class SimUser:
    """One simulated user: their real history and their real future (positive events, in time order)."""

    user_id: str
    history: np.ndarray  # catalog indices, oldest first
    actions: np.ndarray  # action names aligned with history
    future: np.ndarray  # catalog indices of their next real positive events
    future_actions: np.ndarray  # the real action of each future event
    start: float  # time of the first request (seconds): just after the last history event


def users_from_split(split: Split, start: Literal["test", "valid"] = "test") -> list[SimUser]:
    """The users of a leave-one-out split, cut where a model trained on it has seen nothing after.

    `start="test"`: history = the test case's history, future = [test target]. The protocol of test NDCG@10,
    and the only fair one for models refitted on the validation targets (sasrec and generative by default).
    `start="valid"`: history = the validation case's history, future = [validation target, test target], for
    models trained on the training events only (no refit): a longer real future.
    """
    valid, test = split.valid, split.test
    if list(valid.user_ids) != list(test.user_ids):
        raise ValueError("users_from_split needs a split whose validation and test cases are the same users "
                         "in the same order (leave-one-out)")
    if start not in ("test", "valid"):
        raise ValueError(f"start must be 'test' or 'valid', got {start!r}")
    cases = test if start == "test" else valid

    def action(c, i):
        return c.target_actions[i] if c.target_actions is not None else Action.VIEW.value

    out = []
    for i, u in enumerate(cases.user_ids):
        prev = cases.previous_times[i] if cases.previous_times is not None else np.nan
        future = [test.targets[i]] if start == "test" else [valid.targets[i], test.targets[i]]
        future_actions = [action(test, i)] if start == "test" else [action(valid, i), action(test, i)]
        out.append(SimUser(str(u), np.asarray(cases.histories[i], dtype=np.int64),
                           np.asarray(cases.actions[i], dtype=object), np.asarray(future, dtype=np.int64),
                           np.asarray(future_actions, dtype=object), 0.0 if np.isnan(prev) else float(prev)))
    return out


def split_users(users: Sequence[SimUser], feedback_share: float = 0.5,
                seed: int = 0) -> tuple[list[SimUser], list[SimUser]]:
    """Disjoint (feedback, evaluation) groups, drawn with a seed: the loop learns from the first, is measured
    on the second."""
    if not 0 < feedback_share < 1:
        raise ValueError(f"feedback_share must be in (0, 1), got {feedback_share}")
    order = np.random.default_rng(seed).permutation(len(users))
    cut = round(feedback_share * len(users))
    return [users[i] for i in order[:cut]], [users[i] for i in order[cut:]]


@dataclass
class Lists:
    """What a policy returns for a batch of requests."""

    items: np.ndarray  # [B, n] catalog indices, best first
    propensities: np.ndarray | None = None  # [B, n] the probability the policy had of putting each item there
    version: str = ""  # the model version that made them


Policy = Callable[[list[np.ndarray], list[np.ndarray], int], Lists]


class RecommenderPolicy:
    """A deterministic policy from any recommender: its top n by `score`, history excluded."""

    def __init__(self, recommender: Recommender, version: str = "", batch_size: int = 256,
                 exclude_history: bool = True):
        self.recommender = recommender
        self.version = version or type(recommender).__name__
        self.batch_size = batch_size
        self.exclude_history = exclude_history

    def __call__(self, histories: list[np.ndarray], actions: list[np.ndarray], n: int) -> Lists:
        out = np.empty((len(histories), n), dtype=np.int64)
        for s in range(0, len(histories), self.batch_size):
            h, a = histories[s:s + self.batch_size], actions[s:s + self.batch_size]
            scores = np.array(self.recommender.score(h, a), dtype=np.float32, copy=True)
            if self.exclude_history:
                for r, hist in enumerate(h):
                    if len(hist):
                        scores[r, hist] = -np.inf
            top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            out[s:s + len(h)] = np.take_along_axis(top, order, axis=1)
        return Lists(out, None, self.version)


class Related:
    """The items a future item makes interesting: its nearest text neighbours and most co-bought items."""

    def __init__(self, train: pd.DataFrame, n_items: int, k: int, item_vectors: np.ndarray | None = None):
        self.k = k
        self.vectors = None if item_vectors is None else np.asarray(item_vectors, dtype=np.float32)
        if self.vectors is not None and len(self.vectors) != n_items:
            raise ValueError(f"item_vectors has {len(self.vectors)} rows for {n_items} catalog items")
        pos = train[positive_mask(train["action"].to_numpy(dtype=object))]
        users, u = np.unique(pos["user_id"].to_numpy(dtype=object), return_inverse=True)
        x = sp.csr_matrix((np.ones(len(pos), np.float32), (u, pos["item_idx"].to_numpy(np.int64))),
                          shape=(len(users), n_items))
        x.data[:] = 1.0  # a user counts once per item pair
        co = (x.T @ x).tocsr()  # [items, items] users who had both
        self.co = (co - sp.diags(co.diagonal())).tocsr()
        self.co.eliminate_zeros()
        self._cache: dict[int, np.ndarray] = {}

    def of(self, item: int) -> np.ndarray:
        got = self._cache.get(item)
        if got is not None:
            return got
        parts = []
        row = self.co.getrow(item)
        if row.nnz and self.k:
            top = np.argsort(-row.data, kind="stable")[: self.k]
            parts.append(row.indices[top])
        if self.vectors is not None and self.k:
            sims = self.vectors @ self.vectors[item]
            sims[item] = -np.inf
            parts.append(np.argpartition(-sims, self.k)[: self.k])
        got = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        self._cache[item] = got
        return got


@dataclass
class SimLog:
    """What a simulation produced: the lists shown and the events they drew."""

    impressions: list[Impression]
    events: pd.DataFrame  # canonical event columns (event_id, user_id, item_id, action, timestamp, request_id, value)
    found: dict[str, int] = field(default_factory=dict)  # user -> how many future items they clicked
    n_users: int = 0

    def rewarded(self, cfg: RewardConfig | None = None) -> pd.DataFrame:
        """One row per slot shown, with its actions and reward (dragonrec.rewards)."""
        return rewards(attribute(self.impressions, self.events, cfg), cfg)

    def summary(self, cfg: RewardConfig | None = None) -> dict:
        """Reward per impression, click-through (overall and by position), purchases per impression, the share
        of users who found (clicked) a future item, and the counts behind them."""
        slots = self.rewarded(cfg)
        lists = impression_rewards(slots, cfg)
        clicked = slots["n_click"].to_numpy() > 0
        pos = slots["position"].to_numpy()
        by_pos = {int(p) + 1: float(clicked[pos == p].mean()) for p in np.unique(pos)}
        return {
            "users": self.n_users, "impressions": len(lists), "slots": len(slots),
            "reward_per_impression": float(lists["reward"].mean()) if len(lists) else 0.0,
            "ctr": float(clicked.mean()) if len(slots) else 0.0,
            "ctr_by_position": by_pos,
            "purchases_per_impression": float(slots["n_purchase"].sum() / max(len(lists), 1)),
            "carts_per_impression": float(slots["n_add_to_cart"].sum() / max(len(lists), 1)),
            "scroll_past_share": float((slots["n_scroll_past"].to_numpy() > 0).mean()) if len(slots) else 0.0,
            "users_finding_future": float(np.mean([self.found.get(u, 0) > 0 for u in self._user_ids()]))
            if self.n_users else 0.0,
        }

    def _user_ids(self) -> list[str]:
        return sorted({imp.user_id for imp in self.impressions})


def _rng(seed: int, user_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(user_id.encode())])


def examination(n: int, kind: str = "log") -> np.ndarray:
    """P(examine) of positions 1..n."""
    if kind == "all":
        return np.ones(n)
    return 1.0 / np.log2(1.0 + np.arange(1, n + 1))


_FUNNEL = {  # the deepest real action on a future item -> the steps after the click
    Action.PURCHASE.value: (Action.ADD_TO_CART.value, Action.PURCHASE.value),
    Action.REVIEW.value: (Action.ADD_TO_CART.value, Action.PURCHASE.value),
    Action.ADD_TO_CART.value: (Action.ADD_TO_CART.value,),
}


class _Session:
    """One user's state during a run."""

    def __init__(self, user: SimUser, seed: int):
        self.user = user
        self.rng = _rng(seed, user.user_id)
        self.history = list(map(int, user.history))
        self.actions = list(map(str, user.actions))
        self.future = list(map(int, user.future))
        self.future_actions = list(map(str, user.future_actions))
        self.clock = float(user.start) + 1.0
        self.requests = 0
        self.found = 0
        self.done = False


class Simulator:
    """Runs policies against simulated users; see the module docstring for the behaviour."""

    def __init__(self, catalog: Catalog, train: pd.DataFrame, cfg: SimulatorConfig | None = None,
                 item_vectors: np.ndarray | None = None):
        self.catalog = catalog
        self.cfg = cfg or SimulatorConfig()
        self.related = Related(train, len(catalog), self.cfg.related_k, item_vectors)
        self.item_ids = np.asarray(catalog.item_ids, dtype=object)

    def run(self, policy: Policy, users: Sequence[SimUser], seed: int = 0, pipeline: str = "",
            batch_size: int = 512) -> SimLog:
        """Every user's session against `policy`; requests are batched across users, one wave per request."""
        cfg = self.cfg
        sessions = [_Session(u, seed) for u in users]
        impressions: list[Impression] = []
        rows: list[tuple] = []
        exam = examination(cfg.list_size, cfg.examination)
        while True:
            live = [s for s in sessions if not s.done]
            if not live:
                break
            for b in range(0, len(live), batch_size):
                batch = live[b:b + batch_size]
                lists = policy([np.asarray(s.history, np.int64) for s in batch],
                               [np.asarray(s.actions, dtype=object) for s in batch], cfg.list_size)
                items = np.asarray(lists.items, dtype=np.int64)
                if items.shape != (len(batch), cfg.list_size):
                    raise ValueError(f"policy returned lists of shape {items.shape}, "
                                     f"expected {(len(batch), cfg.list_size)}")
                for r, s in enumerate(batch):
                    prop = None if lists.propensities is None else lists.propensities[r]
                    imp, ev = self._respond(s, items[r], prop, exam, lists.version, pipeline)
                    impressions.append(imp)
                    rows.extend(ev)
        events = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "action", "timestamp",
                                             "request_id", "value"])
        return SimLog(impressions, events, {s.user.user_id: s.found for s in sessions}, len(sessions))

    def expected_rewards(self, users: Sequence[SimUser], lists: np.ndarray,
                         reward: RewardConfig | None = None) -> np.ndarray:
        """[B, n] the expected reward of each slot of lists[b] shown to users[b] as the first request of a
        session (their whole future still ahead), under `reward`'s weights with `combine="max"` (the default):
        the simulator used as an environment, e.g. the reward of a policy-gradient learner. No randomness."""
        cfg, w = self.cfg, (reward or RewardConfig()).weights
        lists = np.asarray(lists, dtype=np.int64)
        if lists.ndim != 2 or len(lists) != len(users):
            raise ValueError(f"lists must be [len(users), n], got {lists.shape} for {len(users)} users")
        if (reward or RewardConfig()).combine != "max":
            raise ValueError("expected_rewards supports combine='max' only")
        exam = examination(lists.shape[1], cfg.examination)
        click, cart, buy, scroll = (w[Action.CLICK.value], w[Action.ADD_TO_CART.value], w[Action.PURCHASE.value],
                                    w[Action.SCROLL_PAST.value])
        hover = w[Action.HOVER.value]
        pc, pp = cfg.p_cart_after_click, cfg.p_purchase_after_cart
        # A browse click: click, then cart (pc), then purchase (pp) or not; the deepest step counts (max).
        browse = (1 - pc) * click + pc * (pp * max(buy, cart) + (1 - pp) * cart)
        out = np.zeros(lists.shape, dtype=np.float64)
        for b, u in enumerate(users):
            related = set(np.concatenate([self.related.of(int(f)) for f in u.future]).tolist()) \
                if len(u.future) else set()
            future = dict(zip(map(int, u.future), map(str, u.future_actions)))
            for p, item in enumerate(lists[b].tolist()):
                if item in future:
                    steps = _FUNNEL.get(future[item], ())
                    f = cfg.p_follow
                    depth = [click] + [w[x] for x in steps]  # reward if the funnel stops after step j
                    reach = [f ** j for j in range(len(depth))]  # P(reaching step j)
                    stop = [reach[j] - (reach[j + 1] if j + 1 < len(reach) else 0) for j in range(len(depth))]
                    clicked = sum(s_ * max(depth[:j + 1]) for j, s_ in enumerate(stop))
                    value = cfg.p_click_future * clicked + (1 - cfg.p_click_future) * scroll
                else:
                    p_h, p_c = ((cfg.p_hover_related, cfg.p_click_related) if item in related
                                else (cfg.p_hover_other, cfg.p_click_other))
                    value = p_c * browse + p_h * hover + (1 - p_c - p_h) * scroll
                out[b, p] = exam[p] * value
        return out

    def _respond(self, s: _Session, items: np.ndarray, propensities, exam: np.ndarray, version: str,
                 pipeline: str) -> tuple[Impression, list[tuple]]:
        cfg, rng = self.cfg, s.rng
        s.requests += 1
        request_id = f"sim-{s.user.user_id}-{s.requests}"
        shown_at = s.clock
        imp = Impression(request_id=request_id, user_id=s.user.user_id,
                         item_ids=[str(x) for x in self.item_ids[items]], timestamp=shown_at,
                         model_version=version or None, pipeline=pipeline or None,
                         propensities=None if propensities is None else [float(p) for p in propensities])
        related = set(np.concatenate([self.related.of(f) for f in s.future]).tolist()) if s.future else set()
        events: list[tuple] = []
        # One uniform draw per decision, drawn in a fixed order, so a run depends only on (seed, user, lists).
        draws = rng.random((len(items), 6))
        for p, item in enumerate(items.tolist()):
            u = draws[p]
            if u[0] >= exam[p]:
                continue  # not examined: no event at all
            t = shown_at + (p + 1) * cfg.seconds_per_slot
            acts: list[str] = []
            if item in s.future:
                k = s.future.index(item)
                if u[1] < cfg.p_click_future:
                    acts = [Action.CLICK.value]
                    for step, draw in zip(_FUNNEL.get(s.future_actions[k], ()), u[2:4]):
                        if draw >= cfg.p_follow:
                            break
                        acts.append(step)
                    del s.future[k], s.future_actions[k]
                    s.found += 1
            else:
                is_related = item in related
                p_hover = cfg.p_hover_related if is_related else cfg.p_hover_other
                p_click = cfg.p_click_related if is_related else cfg.p_click_other
                if u[1] < p_click:
                    acts = [Action.CLICK.value]
                    if u[2] < cfg.p_cart_after_click:
                        acts.append(Action.ADD_TO_CART.value)
                        if u[3] < cfg.p_purchase_after_cart:
                            acts.append(Action.PURCHASE.value)
                        elif u[4] < cfg.p_remove_after_cart:
                            acts.append(Action.REMOVE_FROM_CART.value)
                elif u[1] < p_click + p_hover:
                    acts = [Action.HOVER.value]
            if not acts:
                acts = [Action.SCROLL_PAST.value]
            for j, a in enumerate(acts):
                events.append((f"{request_id}-{p}-{j}", s.user.user_id, str(self.item_ids[item]), a,
                               t + 0.1 * j, request_id, np.nan))
            # The history gets the slot's deepest action (what a store's history would show for it).
            s.history.append(int(item))
            s.actions.append(acts[-1])
        s.clock = shown_at + cfg.seconds_between_requests
        if s.requests >= cfg.max_requests or s.rng.random() >= cfg.p_continue:
            s.done = True
        return imp, events


# ---------------------------------------------------------------- fitting on typed logs


def fit_browse_funnel(events: pd.DataFrame) -> dict[str, float]:
    """The browse-funnel and session parameters a typed log supports, with their counts.

    p_cart_after_click: share of (user, item) pairs viewed that were carted; p_purchase_after_cart: share of
    carted pairs that were purchased; p_continue: 1 - 1 / (mean distinct items viewed per session), the
    continuation probability of a geometric session with that mean length (needs `session_id`).
    """
    need = {"user_id", "item_id", "action"}
    if missing := need - set(events.columns):
        raise ValueError(f"fit_browse_funnel: missing column(s) {sorted(missing)}")
    acts = events["action"].astype(str)
    pairs = events.assign(action=acts)[["user_id", "item_id", "action"]].drop_duplicates()
    by = {a: set(map(tuple, pairs.loc[pairs["action"] == a, ["user_id", "item_id"]].to_numpy().tolist()))
          for a in (Action.VIEW.value, Action.ADD_TO_CART.value, Action.PURCHASE.value)}
    viewed, carted, bought = by[Action.VIEW.value], by[Action.ADD_TO_CART.value], by[Action.PURCHASE.value]
    out: dict[str, float] = {"viewed_pairs": len(viewed), "carted_pairs": len(carted),
                             "purchased_pairs": len(bought)}
    if viewed:
        out["p_cart_after_click"] = len(viewed & carted) / len(viewed)
    if carted:
        out["p_purchase_after_cart"] = len(carted & bought) / len(carted)
    if "session_id" in events.columns:
        views = events[acts == Action.VIEW.value]
        per = views.groupby("session_id")["item_id"].nunique()
        if len(per):
            out["mean_items_viewed_per_session"] = float(per.mean())
            out["sessions"] = len(per)
            out["p_continue"] = 1.0 - 1.0 / float(per.mean())
    return out


def summarize_seeds(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and a 95% t-interval half-width over seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else float("nan"), "std": float("nan"),
                "ci95": float("nan"), "n": len(v)}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "ci95": half, "n": len(v)}
