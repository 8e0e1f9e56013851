"""Off-policy estimates: what a target policy would earn, from logs a different (logging) policy collected.

Each logged row is one decision: a context x (the user's history), an action a (an item in a slot, or a
whole list), the reward r it earned and the probability p_log = pi_log(a | x) the logging policy had of taking
it. The target policy's probability of the same action, p_tgt = pi_tgt(a | x), turns the logs into estimates
of the target's value V(pi_tgt) = E_x E_{a ~ pi_tgt(.|x)} [r]:

    w = importance_weights(p_tgt, p_log)                      # w = p_tgt / p_log, one per row
    ips(r, w, lists=request_ids)                              # Horvitz & Thompson 1952
    snips(r, w, lists=request_ids, clip=50)                   # Swaminathan & Joachims 2015
    doubly_robust(r, w, r_hat, r_hat_target, lists=...)       # Dudik, Langford & Li 2011

Every `Estimate` carries a 95% interval (normal or bootstrap, resampling whole lists), the effective sample
size (Kish) of its weights, and the clipping it used. Rows may be slots ("slot as an independent action", the
item-position model: the reward of slot k depends only on the context, k and the item there; Li et al. 2011
for replay/IPS of logged bandit decisions, Li et al. 2018 for ranking with click models) or whole lists (the
target gives each logged list a probability).

From dragonrec's logs (the simulator's or the store's impressions with propensities, scored by `rewards`):

    logging = EpsilonGreedyPolicy(active_model, epsilon=0.3, pool=30)   # exploration with known propensities
    recorded = RecordingPolicy(logging)
    log = sim.run(recorded, users)
    contexts = recorded.contexts(log.impressions, catalog)      # or contexts_from_events(...) for the store
    target = EpsilonGreedyPolicy(candidate_model, epsilon=0.0, pool=30)  # the candidate, served greedily
    table = slot_table(log.rewarded(), contexts, target, catalog)
    estimate_slots(table)   # {"ips": Estimate, "snips": Estimate} (+ "dr" with reward-model columns)

Slot rows: under the item-position model the value of a list is sum_k sum_a pi(a at k | x) q(x, k, a), so
V_list = (1/N) sum_i sum_k w_ik r_ik with w_ik = pi_tgt(a_ik at k | x_i) / pi_log(a_ik at k | x_i): the
estimators below are per slot (mean over slots) and `Estimate.per_list` multiplies by the slots per list. It
is unbiased when a slot's reward does not depend on the other items shown (the simulator's users examine each
position independently); list rows need no such assumption, but a whole list's probability is tiny for long
lists.

Sources: Horvitz & Thompson 1952 (JASA 47:663, IPS); Swaminathan & Joachims 2015 (NeurIPS, "The
self-normalized estimator for counterfactual learning", SNIPS); Dudik, Langford & Li 2011 (ICML, "Doubly
robust policy evaluation and learning"); Li, Chu, Langford & Wang 2011 (WSDM, offline replay evaluation of
logged bandit decisions); Li et al. 2018 (KDD, "Offline evaluation of ranking policies with click models",
item-position IPS); Kish 1965 (Survey Sampling, effective sample size).

Overlap: an estimate only exists where the logging policy could have shown what the target shows. A
deterministic logging policy (p_log = 1) with a different deterministic target has no overlap: the logs never
show what the target would have done, so `importance_weights` raises `NoOverlapError` wherever a row logged
with probability 1 gets p_tgt < 1, and every estimator raises it when all weights are 0 (ESS 0). Elsewhere the
logs cannot prove overlap: the target must only place items the logging policy could have placed (for
`EpsilonGreedyPolicy`: the same pool of the same model, or a pool inside it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import numpy as np
import pandas as pd
from scipy import stats

from dragonrec.data.catalog import Catalog
from dragonrec.evaluate.simulator import Lists, Policy
from dragonrec.preferences import attach_history
from dragonrec.recommenders.base import Recommender
from dragonrec.schema import Impression

_CERTAIN = 1.0 - 1e-9  # a logged probability this close to 1 is a deterministic choice


class NoOverlapError(ValueError):
    """The logs never show what the target policy would do: its value cannot be estimated from them."""


# ---------------------------------------------------------------- estimators


@dataclass(frozen=True)
class Estimate:
    """One off-policy estimate of a target policy's value, per logged row (slot or list).

    `per_list` rescales a slot-level value to a list's (sum over its slots: the simulator's reward per
    impression): value * n / n_lists, and `per_list_ci` its interval.
    """

    method: str  # "ips", "snips" or "dr"
    value: float  # estimated value per row
    ci_low: float
    ci_high: float
    std_error: float  # normal approximation (delta method for SNIPS), clustered by list
    ess: float  # effective sample size of the weights used, (sum w)^2 / sum w^2 (Kish 1965); n when w == 1
    n: int  # rows (slots or lists)
    n_lists: int  # independent units the interval resamples (lists; = n without `lists`)
    clip: float | None  # weights were min(w, clip); None: unclipped
    n_clipped: int  # rows whose weight the clip lowered
    max_weight: float  # largest weight before clipping
    interval: str  # "normal" or "bootstrap"
    level: float  # coverage of [ci_low, ci_high]

    @property
    def per_list(self) -> float:
        return self.value * self.n / self.n_lists

    @property
    def per_list_ci(self) -> tuple[float, float]:
        s = self.n / self.n_lists
        return self.ci_low * s, self.ci_high * s

    def as_dict(self) -> dict:
        return {**asdict(self), "per_list": self.per_list}


def importance_weights(p_target, p_logging) -> np.ndarray:
    """[n] w = p_tgt / p_log for logged rows.

    p_log must be in (0, 1] (a row shown with probability 0, or with none logged, cannot be reweighted) and
    p_tgt in [0, 1]. Raises `NoOverlapError` where the logging policy was certain (p_log = 1) and the target
    would have done something else (p_tgt < 1): the target's other choices there were never logged.
    """
    pt = np.asarray(p_target, dtype=np.float64).ravel()
    pl = np.asarray(p_logging, dtype=np.float64).ravel()
    if pt.shape != pl.shape:
        raise ValueError(f"p_target has {len(pt)} rows, p_logging {len(pl)}")
    if np.isnan(pl).any():
        raise ValueError(f"{int(np.isnan(pl).sum())} row(s) have no logged propensity: off-policy estimates "
                         "need a stochastic logging policy that logs them (EpsilonGreedyPolicy)")
    if ((pl <= 0) | (pl > 1 + 1e-9)).any():
        raise ValueError("logged propensities must be in (0, 1]: a row was logged with probability "
                         f"{pl[(pl <= 0) | (pl > 1 + 1e-9)][0]!r}")
    if (~np.isfinite(pt) | (pt < 0) | (pt > 1 + 1e-9)).any():
        raise ValueError("target probabilities must be in [0, 1]")
    gap = (pl >= _CERTAIN) & (pt < _CERTAIN)
    if gap.any():
        raise NoOverlapError(
            f"{int(gap.sum())} of {len(pl)} logged row(s) were chosen deterministically (p_log = 1) where "
            "the target policy would choose otherwise (mean target mass elsewhere "
            f"{float(np.mean(1 - pt[gap])):.3f}): the logs never show what the target does there, so its "
            "value is undefined. Log with exploration (EpsilonGreedyPolicy) to evaluate a different policy.")
    return pt / pl


def effective_sample_size(weights) -> float:
    """(sum w)^2 / sum w^2 (Kish 1965): n when every weight is equal, 1 when one row carries them all, 0 when
    every weight is 0."""
    w = np.asarray(weights, dtype=np.float64)
    sq = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / sq if sq > 0 else 0.0


def _prepare(reward, weights, lists, clip: float | None):
    r = np.asarray(reward, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    if r.shape != w.shape:
        raise ValueError(f"reward has {len(r)} rows, weights {len(w)}")
    if not len(r):
        raise ValueError("no logged rows")
    if not (np.isfinite(r).all() and np.isfinite(w).all()) or (w < 0).any():
        raise ValueError("rewards must be finite and weights finite and >= 0")
    if lists is None:
        codes = np.arange(len(r))
    else:
        codes, _ = pd.factorize(pd.Series(np.asarray(lists, dtype=object).ravel()), sort=False)
        if len(codes) != len(r):
            raise ValueError(f"lists has {len(codes)} rows, reward {len(r)}")
    max_weight = float(w.max())
    n_clipped = 0
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        n_clipped = int((w > clip).sum())
        w = np.minimum(w, clip)  # bias (towards the logged rewards) traded for variance
    if not w.sum() > 0:
        raise NoOverlapError(f"the target policy gives probability 0 to every one of the {len(w)} logged "
                             "rows (ESS 0): the logs hold nothing it would do, so its value is undefined")
    return r, w, codes, max_weight, n_clipped


def _ratio(num: np.ndarray, den: np.ndarray, codes: np.ndarray, *, method: str, w: np.ndarray, clip,
           n_clipped: int, max_weight: float, interval: str, level: float, n_boot: int,
           seed: int) -> Estimate:
    """V = sum(num) / sum(den), its interval from the per-list sums (lists are the independent units)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    g = int(codes.max()) + 1
    a = np.bincount(codes, weights=num, minlength=g)
    b = np.bincount(codes, weights=den, minlength=g)
    value = float(a.sum() / b.sum())
    # Linearisation of the ratio (delta method): psi_g = (a_g - V b_g) / mean(b); for IPS/DR b_g is the
    # list's row count and this is the cluster-robust standard error of a mean.
    psi = a - value * b
    se = float(np.sqrt(g / max(g - 1, 1) * np.sum(psi * psi)) / b.sum())
    if interval == "normal":
        z = float(stats.norm.ppf(0.5 + level / 2))
        lo, hi = value - z * se, value + z * se
    elif interval == "bootstrap":
        rng = np.random.default_rng(seed)
        reps = []
        chunk = max(1, 2_000_000 // g)  # [chunk, g] resampled lists at a time, never [n_boot, g]
        for s in range(0, n_boot, chunk):
            idx = rng.integers(g, size=(min(chunk, n_boot - s), g))
            reps.append(a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1e-300))
        reps = np.concatenate(reps)
        lo, hi = (float(x) for x in np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]))
    else:
        raise ValueError(f"interval must be 'normal' or 'bootstrap', got {interval!r}")
    return Estimate(method, value, float(lo), float(hi), se, effective_sample_size(w), len(num), g,
                    None if clip is None else float(clip), n_clipped, max_weight, interval, level)


Interval = Literal["normal", "bootstrap"]


def ips(reward, weights, lists=None, *, clip: float | None = None, interval: Interval = "normal",
        level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Inverse propensity scoring. reward, weights: [n] per logged row; lists: [n] the list (request) each row
    belongs to, so the interval resamples whole lists (rows of one list are not independent); clip: cap
    on the weights (biased, lower variance)."""
    r, w, codes, max_w, n_clipped = _prepare(reward, weights, lists, clip)
    # V_IPS = (1/n) sum_i w_i r_i,  w_i = pi_tgt(a_i|x_i) / pi_log(a_i|x_i)      (Horvitz & Thompson 1952)
    return _ratio(w * r, np.ones_like(r), codes, method="ips", w=w, clip=clip, n_clipped=n_clipped,
                  max_weight=max_w, interval=interval, level=level, n_boot=n_boot, seed=seed)


def snips(reward, weights, lists=None, *, clip: float | None = None, interval: Interval = "normal",
          level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Self-normalised IPS: slightly biased, consistent, far less variance when weights are large. Arguments
    as `ips`."""
    r, w, codes, max_w, n_clipped = _prepare(reward, weights, lists, clip)
    # V_SNIPS = sum_i w_i r_i / sum_i w_i                                        (Swaminathan & Joachims 2015)
    return _ratio(w * r, w, codes, method="snips", w=w, clip=clip, n_clipped=n_clipped, max_weight=max_w,
                  interval=interval, level=level, n_boot=n_boot, seed=seed)


def doubly_robust(reward, weights, r_hat, r_hat_target, lists=None, *, clip: float | None = None,
                  interval: Interval = "normal", level: float = 0.95, n_boot: int = 1000,
                  seed: int = 0) -> Estimate:
    """Doubly robust: a reward model's prediction under the target policy, corrected by the weighted residual
    of the logged action. Unbiased when either the propensities or the reward model are right; with a good
    reward model, far less variance than IPS.

    r_hat: [n] the model's predicted reward of the logged action r_hat(x_i, a_i); r_hat_target: [n] the
    expected predicted reward of the target at that row, sum_a pi_tgt(a|x_i) r_hat(x_i, a) (at the same slot
    position for slot rows; `EpsilonGreedyPolicy.support` and `direct_method` compute it).
    """
    r, w, codes, max_w, n_clipped = _prepare(reward, weights, lists, clip)
    rh = np.asarray(r_hat, dtype=np.float64).ravel()
    dm = np.asarray(r_hat_target, dtype=np.float64).ravel()
    if rh.shape != r.shape or dm.shape != r.shape:
        raise ValueError("r_hat and r_hat_target need one value per logged row")
    if not (np.isfinite(rh).all() and np.isfinite(dm).all()):
        raise ValueError("reward-model predictions must be finite")
    # V_DR = (1/n) sum_i [sum_a pi_tgt(a|x_i) r_hat(x_i, a) + w_i (r_i - r_hat(x_i, a_i))]   (Dudik 2011)
    return _ratio(dm + w * (r - rh), np.ones_like(r), codes, method="dr", w=w, clip=clip, n_clipped=n_clipped,
                  max_weight=max_w, interval=interval, level=level, n_boot=n_boot, seed=seed)


def direct_method(probs: np.ndarray, r_hat: np.ndarray) -> np.ndarray:
    """[B, n] expected predicted reward of a policy per context and slot, sum_s probs[b, k, s] r_hat[b, k, s]:
    probs [B, n, S] the policy's probability of support item s at position k (`EpsilonGreedyPolicy.support`),
    r_hat [B, n, S] (or [B, S], position-free) the reward model's prediction for it."""
    p = np.asarray(probs, dtype=np.float64)
    rh = np.asarray(r_hat, dtype=np.float64)
    if rh.ndim == 2:
        rh = rh[:, None, :]
    return np.einsum("bks,bks->bk", p, np.broadcast_to(rh, p.shape))


# ---------------------------------------------------------------- policies with known propensities


class TargetPolicy(Protocol):
    def probabilities(self, histories: list[np.ndarray], actions: list[np.ndarray],
                      items: np.ndarray) -> np.ndarray:
        """[B, n]: P(the policy puts items[b, k] at position k | context b), for lists as shown."""


TargetProbabilities = Callable[[list[np.ndarray], list[np.ndarray], np.ndarray], np.ndarray]


class EpsilonGreedyPolicy:
    """A recommender's top n, or (with probability `epsilon`, per request) a uniformly random ordered n of its
    top `pool`: a stochastic policy whose propensities are known exactly, so its logs support off-policy
    estimates of any policy that places items of the same pool.

        P(a at position k | x) = (1 - eps) 1[a = g_k(x)] + eps 1[a in top_M(x)] / M
        P(list L | x)          = (1 - eps) 1[L = g(x)]   + eps 1[L ordered n of top_M(x)] (M - n)! / M!

    g(x) is the top n by score (history excluded, as `RecommenderPolicy`), top_M(x) the top M = `pool` (fewer
    when fewer items are left); a uniformly random ordered n-subset of M items puts each at each position with
    probability 1/M. epsilon = 0 is the deterministic greedy policy (every p = 0 or 1). The recommender must
    score a history the same way whatever batch it is in (the probabilities recompute its ranking).
    """

    def __init__(self, recommender: Recommender, epsilon: float = 0.1, pool: int = 50, seed: int = 0,
                 exclude_history: bool = True, version: str = "", batch_size: int = 256):
        if not 0 <= epsilon <= 1:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.recommender = recommender
        self.epsilon = float(epsilon)
        self.pool = int(pool)
        self.exclude_history = exclude_history
        self.version = version or f"{type(recommender).__name__}-eps{epsilon:g}"
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def ranked(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None,
               m: int) -> np.ndarray:
        """[B, m] the m best catalog indices by score, best first (ties: lower index first); -1 past the last
        item that can be shown (history excluded, -inf scores)."""
        out = np.full((len(histories), m), -1, dtype=np.int64)
        for s in range(0, len(histories), self.batch_size):
            h = [np.asarray(x, dtype=np.int64) for x in histories[s:s + self.batch_size]]
            a = None if actions is None else list(actions[s:s + self.batch_size])
            scores = np.array(self.recommender.score(h, a), dtype=np.float32, copy=True)
            if self.exclude_history:
                for r, hist in enumerate(h):
                    if len(hist):
                        scores[r, hist] = -np.inf
            k = min(m, scores.shape[1])
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
                np.tile(np.arange(scores.shape[1]), (len(h), 1))
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.lexsort((top, -top_scores), axis=1)  # score descending, then index
            top = np.take_along_axis(top, order, axis=1)
            top[~np.isfinite(np.take_along_axis(scores, top, axis=1))] = -1
            out[s:s + len(h), :k] = top
        return out

    def _pool(self, histories, actions, n: int) -> tuple[np.ndarray, np.ndarray]:
        """([B, max(M, n)] pool best first (-1 padded), [B] its size M_b)."""
        ranked = self.ranked(histories, actions, max(self.pool, n))
        avail = (ranked >= 0).sum(axis=1)
        if (avail < n).any():
            b = int(np.flatnonzero(avail < n)[0])
            raise ValueError(f"context {b}: only {avail[b]} items can be shown, fewer than the list size {n}")
        return ranked, np.minimum(avail, max(self.pool, n))

    def __call__(self, histories: list[np.ndarray], actions: list[np.ndarray], n: int) -> Lists:
        ranked, m = self._pool(histories, actions, n)
        items = ranked[:, :n].copy()
        explore = self.rng.random(len(histories)) < self.epsilon
        for b in np.flatnonzero(explore):
            items[b] = ranked[b, self.rng.permutation(int(m[b]))[:n]]
        greedy = items == ranked[:, :n]
        prop = (1 - self.epsilon) * greedy + self.epsilon / m[:, None]
        return Lists(items, prop, self.version)

    def probabilities(self, histories: list[np.ndarray], actions: list[np.ndarray],
                      items: np.ndarray) -> np.ndarray:
        """[B, n] P(items[b, k] at position k | context b); items -1 (no item) get 0."""
        items = np.asarray(items, dtype=np.int64)
        n = items.shape[1]
        ranked, m = self._pool(histories, actions, n)
        in_pool = np.array([np.isin(items[b], ranked[b, :m[b]]) for b in range(len(items))])
        in_pool = in_pool.reshape(items.shape)
        p = (1 - self.epsilon) * (items == ranked[:, :n]) + self.epsilon * in_pool / m[:, None]
        return np.where(items >= 0, p, 0.0)

    def list_probabilities(self, histories: list[np.ndarray], actions: list[np.ndarray],
                           items: np.ndarray) -> np.ndarray:
        """[B] P(exactly the list items[b] | context b), for list-level estimates."""
        items = np.asarray(items, dtype=np.int64)
        n = items.shape[1]
        ranked, m = self._pool(histories, actions, n)
        out = np.zeros(len(items))
        for b in range(len(items)):
            ordered_subset = len(set(items[b].tolist())) == n and np.isin(items[b], ranked[b, :m[b]]).all()
            # log(M! / (M - n)!) = sum_{j < n} log(M - j): the number of ordered n-subsets of the pool
            n_lists = sum(math.log(int(m[b]) - j) for j in range(n))
            out[b] = ((1 - self.epsilon) * bool((items[b] == ranked[b, :n]).all())
                      + self.epsilon * ordered_subset * math.exp(-n_lists))
        return out

    def support(self, histories: list[np.ndarray], actions: list[np.ndarray],
                n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every item the policy may show and where: (items [B, S] with S = max(pool, n), -1 padded; probs
        [B, n, S] P(items[b, s] at position k)); each position's probabilities sum to 1."""
        ranked, m = self._pool(histories, actions, n)
        valid = ranked >= 0
        greedy = (ranked[:, None, :] == ranked[:, :n, None]) & valid[:, None, :]
        probs = (1 - self.epsilon) * greedy + (self.epsilon / m)[:, None, None] * valid[:, None, :]
        return ranked, probs


class RecordingPolicy:
    """Wraps a policy and remembers every context it was asked about and the list it returned, in call order,
    so that the contexts of a simulator run's impressions are known exactly (`contexts`)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.histories: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.items: list[np.ndarray] = []

    def __call__(self, histories: list[np.ndarray], actions: list[np.ndarray], n: int) -> Lists:
        lists = self.policy(histories, actions, n)
        self.histories += [np.array(h, dtype=np.int64) for h in histories]
        self.actions += [np.array(a, dtype=object) for a in actions]
        self.items += [np.array(x, dtype=np.int64) for x in np.asarray(lists.items)]
        return lists

    def contexts(self, impressions: Sequence[Impression], catalog: Catalog) -> dict[str, tuple[np.ndarray,
                                                                                                np.ndarray]]:
        """request_id -> (history, actions) of each impression, matched to the calls in order (the simulator
        shows lists in the order the policy returned them); checked item by item."""
        if len(impressions) != len(self.items):
            raise ValueError(f"{len(impressions)} impressions but the policy answered {len(self.items)} "
                             "requests")
        out = {}
        for imp, h, a, shown in zip(impressions, self.histories, self.actions, self.items, strict=True):
            if not np.array_equal(catalog.indices(imp.item_ids), shown):
                raise ValueError(f"impression {imp.request_id!r} does not show the list the policy returned "
                                 "for it: the recording is not this log's")
            out[imp.request_id] = (h, a)
        return out


def contexts_from_events(impressions: Iterable[Impression | Mapping] | pd.DataFrame, events: pd.DataFrame,
                         catalog: Catalog,
                         max_history: int = 10_000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """request_id -> (history, actions): the user's events strictly before each impression (the store's
    logs, where no policy call was recorded), catalog indices and action names, oldest first; items the
    catalog lacks are left out. The simulator's own history keeps one entry per answered slot (its deepest
    action); these keep every event, so a sequence model may score the two slightly differently."""
    if isinstance(impressions, pd.DataFrame):
        req = impressions[["request_id", "user_id", "timestamp"]].drop_duplicates("request_id")
    else:
        rows = [imp if isinstance(imp, Mapping) else imp.model_dump() for imp in impressions]
        req = pd.DataFrame({c: [r.get(c) for r in rows] for c in ("request_id", "user_id", "timestamp")})
    req = req.assign(timestamp=pd.to_numeric(req["timestamp"], errors="coerce").astype(np.float64))
    req = attach_history(req.reset_index(drop=True), events, max_history)
    out = {}
    for rid, items, acts in zip(req["request_id"].astype(str), req["history"], req["history_actions"],
                                strict=True):
        keep = [k for k, i in enumerate(items) if i in catalog]
        out[rid] = (catalog.indices([items[k] for k in keep]),
                    np.array([acts[k] for k in keep], dtype=object))
    return out


# ---------------------------------------------------------------- dragonrec's logs


def slot_table(rewarded: pd.DataFrame, contexts: Mapping[str, tuple[np.ndarray, np.ndarray]],
               target: TargetPolicy | TargetProbabilities, catalog: Catalog,
               batch_size: int = 512) -> pd.DataFrame:
    """One row per logged slot, in (request, position) order: request_id, user_id, position, item_id, reward,
    p_log (the logged propensity) and p_tgt (the target's probability of that item at that position).

    rewarded: `rewards.rewards` output (or any table with request_id, user_id, position, item_id, reward,
    propensity); contexts: request_id -> (history, actions) (`RecordingPolicy.contexts`,
    `contexts_from_events`); target: an object with `probabilities(histories, actions, items)` (as
    `EpsilonGreedyPolicy`) or that function itself: [B, n] for the lists as shown. A deterministic target
    gives 1 where it would place that item there, else 0.
    """
    need = ("request_id", "user_id", "position", "item_id", "reward", "propensity")
    missing = [c for c in need if c not in rewarded.columns]
    if missing:
        raise ValueError(f"slot_table: missing column(s) {', '.join(missing)}; pass the output of rewards()")
    codes, uniq = pd.factorize(rewarded["request_id"].astype(str), sort=False)
    order = np.lexsort((rewarded["position"].to_numpy(), codes))
    df = rewarded.iloc[order][list(need)].reset_index(drop=True)
    codes = codes[order]
    df["request_id"] = df["request_id"].astype(str)
    no_prop = df["propensity"].isna().to_numpy()
    if no_prop.any():
        rid = df["request_id"].iloc[int(np.flatnonzero(no_prop)[0])]
        raise ValueError(f"request {rid!r} was logged without propensities: off-policy estimates need a "
                         "stochastic logging policy that logs them (EpsilonGreedyPolicy)")
    lengths = np.bincount(codes, minlength=len(uniq))
    first = np.cumsum(lengths) - lengths
    unknown = [r for r in uniq if r not in contexts]
    if unknown:
        raise ValueError(f"no context for {len(unknown)} request(s), e.g. {unknown[0]!r}")
    items = catalog.indices(df["item_id"].astype(str))
    probs = getattr(target, "probabilities", target)
    p_tgt = np.zeros(len(df))
    for n in np.unique(lengths):  # one batch of equal-length lists at a time
        reqs = np.flatnonzero(lengths == n)
        for s in range(0, len(reqs), batch_size):
            chunk = reqs[s:s + batch_size]
            rows = first[chunk][:, None] + np.arange(n)[None, :]
            ctx = [contexts[uniq[r]] for r in chunk]
            p = np.asarray(probs([c[0] for c in ctx], [c[1] for c in ctx], items[rows]), dtype=np.float64)
            if p.shape != rows.shape:
                raise ValueError(f"the target returned probabilities of shape {p.shape}, "
                                 f"expected {rows.shape}")
            p_tgt[rows.ravel()] = p.ravel()
    df = df.rename(columns={"propensity": "p_log"})
    df["p_tgt"] = p_tgt
    return df


def estimate_slots(table: pd.DataFrame, *, clip: float | None = None, interval: Interval = "normal",
                   level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """IPS and SNIPS of a `slot_table` (and DR where it has `r_hat` and `r_hat_target` columns: the reward
    model's prediction for the logged slot, and its expectation under the target at that slot), per slot with
    intervals over requests; `Estimate.per_list` is the value per impression."""
    w = importance_weights(table["p_tgt"], table["p_log"])
    kw = {"lists": table["request_id"].to_numpy(), "clip": clip, "interval": interval, "level": level,
          "n_boot": n_boot, "seed": seed}
    out = {"ips": ips(table["reward"], w, **kw), "snips": snips(table["reward"], w, **kw)}
    if {"r_hat", "r_hat_target"} <= set(table.columns):
        out["dr"] = doubly_robust(table["reward"], w, table["r_hat"], table["r_hat_target"], **kw)
    return out


def estimate_candidate(candidate: Recommender, slots: pd.DataFrame, impressions: Sequence[Impression],
                       history_events: pd.DataFrame, catalog: Catalog, *, epsilon: float = 0.0,
                       pool: int | None = None, clip: float | None = None,
                       contexts: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """The loop's gate: SNIPS of a candidate model's reward per slot (served greedily, or epsilon-greedy
    over its top `pool`) from a round's rewarded slots, with the logged reward per slot beside it.

    Returns estimate (SNIPS per slot), logged (mean logged reward per slot), ess, ci, ips, n_slots, n_lists
    and reason. Logs without overlap (deterministic serving and a candidate that differs) give estimate NaN
    and ESS 0 with the reason, rather than an error: the gate refuses on them.
    """
    logged = float(slots["reward"].mean()) if len(slots) else float("nan")
    n_list = int(slots.groupby("request_id")["position"].count().max()) if len(slots) else 1
    if contexts is None:  # what each request saw; give them when estimating several policies on one log
        contexts = contexts_from_events(impressions, history_events, catalog)
    target = EpsilonGreedyPolicy(candidate, epsilon=epsilon, pool=pool or n_list)
    table = slot_table(slots, contexts, target, catalog)
    base = {"logged": logged, "n_slots": len(table), "n_lists": int(table["request_id"].nunique())}
    try:
        est = estimate_slots(table, clip=clip)
    except NoOverlapError as e:
        return {**base, "estimate": float("nan"), "ess": 0.0, "ci": [float("nan")] * 2, "ips": float("nan"),
                "reason": str(e)}
    s = est["snips"]
    return {**base, "estimate": s.value, "ess": s.ess, "ci": [s.ci_low, s.ci_high], "ips": est["ips"].value,
            "reason": f"SNIPS {s.value:.4f} per slot (ESS {s.ess:.0f} of {s.n})"}


__all__ = [
    "EpsilonGreedyPolicy", "Estimate", "NoOverlapError", "RecordingPolicy", "TargetPolicy",
    "contexts_from_events", "direct_method", "doubly_robust", "effective_sample_size", "estimate_candidate",
    "estimate_slots", "importance_weights", "ips", "slot_table", "snips",
]
