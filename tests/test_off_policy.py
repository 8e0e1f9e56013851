"""Off-policy estimates: synthetic bandits whose true value is known in closed form, and the simulator."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dragonrec.data.catalog import Catalog
from dragonrec.data.readers import load_dataset
from dragonrec.data.splits import leave_one_out
from dragonrec.evaluate.off_policy import (
    EpsilonGreedyPolicy,
    NoOverlapError,
    RecordingPolicy,
    contexts_from_events,
    direct_method,
    doubly_robust,
    effective_sample_size,
    estimate_candidate,
    estimate_slots,
    importance_weights,
    ips,
    slot_table,
    snips,
)
from dragonrec.evaluate.simulator import RecommenderPolicy, Simulator, SimulatorConfig, users_from_split
from dragonrec.recommenders import build
from dragonrec.recommenders.base import Recommender
from dragonrec.rewards import impression_rewards

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# ---------------------------------------------------------------- a contextual bandit with a known value

# 4 contexts (equally likely) x 5 arms; Q[x, a] = P(click). The logging policy prefers the bad arms, the
# target the good ones, so the logged mean is far from the target's value.
Q = np.array([[0.10, 0.30, 0.50, 0.70, 0.90],
              [0.80, 0.60, 0.40, 0.20, 0.05],
              [0.05, 0.90, 0.10, 0.60, 0.30],
              [0.50, 0.20, 0.80, 0.10, 0.40]])


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


PI_LOG = _softmax(-2.0 * Q)
PI_TGT = _softmax(3.0 * Q)
TRUE_VALUE = float(np.mean(np.sum(PI_TGT * Q, axis=1)))  # V = E_x sum_a pi_tgt(a|x) Q[x, a]


def _categorical(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of p [n, K]."""
    return (rng.random((len(p), 1)) > np.cumsum(p, axis=1)).sum(axis=1)


def _draw(n: int, rng: np.random.Generator, pi_log=PI_LOG):
    x = rng.integers(len(Q), size=n)
    a = _categorical(pi_log[x], rng)
    r = (rng.random(n) < Q[x, a]).astype(np.float64)
    return x, a, r


def test_estimators_on_hand_computed_numbers():
    r, w = np.array([1.0, 0.0, 1.0]), np.array([2.0, 1.0, 0.5])
    assert ips(r, w).value == pytest.approx(2.5 / 3)  # (2 + 0 + 0.5) / 3
    assert snips(r, w).value == pytest.approx(2.5 / 3.5)  # (2 + 0 + 0.5) / (2 + 1 + 0.5)
    # DR: mean of 0.6 + w (r - 0.5) = (1.6 + 0.1 + 0.85) / 3
    assert doubly_robust(r, w, np.full(3, 0.5), np.full(3, 0.6)).value == pytest.approx(0.85)
    assert ips(r, w).ess == pytest.approx(3.5**2 / 5.25)
    assert ips(r, w).std_error == pytest.approx(np.std([2.0, 0.0, 0.5], ddof=1) / np.sqrt(3))
    clipped = ips(r, w, clip=1.5)
    assert clipped.value == pytest.approx(2.0 / 3) and clipped.n_clipped == 1 and clipped.max_weight == 2.0
    per_slot = ips([1.0, 0.0, 1.0, 1.0], np.ones(4), lists=["a", "a", "b", "b"])
    assert per_slot.value == 0.75 and per_slot.per_list == 1.5 and per_slot.n_lists == 2


def test_ips_and_snips_recover_the_true_value():
    rng = np.random.default_rng(0)
    n = 50_000
    x, a, r = _draw(n, rng)
    w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
    naive = r.mean()
    assert abs(naive - TRUE_VALUE) > 0.3, (naive, TRUE_VALUE)  # the logged mean says nothing about the target
    for est in (ips(r, w), snips(r, w), ips(r, w, interval="bootstrap"), snips(r, w, interval="bootstrap")):
        assert abs(est.value - TRUE_VALUE) < 0.03, (est.method, est.value, TRUE_VALUE)
        assert est.ci_high - est.ci_low < 0.06
        assert est.n == est.n_lists == n and 0 < est.ess < n
    # weights the wrong way round (p_log / p_tgt) are far off: the test can tell a wrong estimator
    assert abs(ips(r, 1 / w).value - TRUE_VALUE) > 0.1
    # the normal interval covers the truth about 95% of the time over repeats
    covered = []
    for _ in range(300):
        x, a, r = _draw(1000, rng)
        w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
        covered += [e.ci_low <= TRUE_VALUE <= e.ci_high for e in (ips(r, w), snips(r, w))]
    assert 0.9 < np.mean(covered) < 0.99, np.mean(covered)


def test_doubly_robust_with_a_perfect_reward_model_has_lower_variance_than_ips():
    rng = np.random.default_rng(1)
    dm_of_context = np.sum(PI_TGT * Q, axis=1)  # sum_a pi_tgt(a|x) r_hat(x, a) with r_hat = Q
    by = {"ips": [], "dr": [], "dr_biased_model": []}
    for _ in range(200):
        x, a, r = _draw(1000, rng)
        w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
        by["ips"].append(ips(r, w).value)
        by["dr"].append(doubly_robust(r, w, Q[x, a], dm_of_context[x]).value)
        # a wrong reward model: still unbiased, because the propensities are right (double robustness)
        by["dr_biased_model"].append(doubly_robust(r, w, Q[x, a] + 0.3, dm_of_context[x] + 0.3).value)
    v = {k: np.asarray(x) for k, x in by.items()}
    assert v["dr"].var() < 0.5 * v["ips"].var(), (v["dr"].var(), v["ips"].var())
    for k in by:
        assert abs(v[k].mean() - TRUE_VALUE) < 4 * v[k].std() / np.sqrt(len(v[k])) + 1e-3, k
    # a reward model that predicts 0 everywhere turns DR into IPS
    x, a, r = _draw(500, rng)
    w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
    assert doubly_robust(r, w, np.zeros(500), np.zeros(500)).value == pytest.approx(ips(r, w).value)


def test_effective_sample_size_is_n_when_the_target_is_the_logging_policy():
    rng = np.random.default_rng(2)
    x, a, r = _draw(5000, rng)
    w = importance_weights(PI_LOG[x, a], PI_LOG[x, a])
    for est in (ips(r, w), snips(r, w)):
        assert est.ess == pytest.approx(5000)
        assert est.value == pytest.approx(r.mean())  # and the estimate is the logged mean
    assert effective_sample_size([1.0, 0.0, 3.0]) == pytest.approx(16 / 10)
    assert effective_sample_size([0.0, 0.0]) == 0.0
    w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
    assert ips(r, w).ess == pytest.approx(w.sum() ** 2 / (w * w).sum())


def test_no_overlap_is_refused():
    rng = np.random.default_rng(3)
    never_arm0 = PI_LOG.copy()
    never_arm0[:, 0] = 0
    never_arm0 /= never_arm0.sum(axis=1, keepdims=True)
    x, a, r = _draw(2000, rng, never_arm0)
    # the target always plays arm 0, which the logging policy never showed: every weight is 0, ESS 0
    w = importance_weights((a == 0).astype(float), never_arm0[x, a])
    assert w.sum() == 0 and effective_sample_size(w) == 0
    for estimator in (ips, snips):
        with pytest.raises(NoOverlapError, match="ESS 0"):
            estimator(r, w)
    # deterministic logging (p = 1) and a different deterministic target: no estimate exists
    greedy_log = Q.argmin(axis=1)[x]
    greedy_tgt = Q.argmax(axis=1)[x]
    with pytest.raises(NoOverlapError, match="deterministically"):
        importance_weights((greedy_log == greedy_tgt).astype(float), np.ones(len(x)))
    # the same deterministic policy is fine: every weight is 1
    assert importance_weights(np.ones(4), np.ones(4)).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="no logged propensity"):
        importance_weights([0.5, 0.5], [0.5, np.nan])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        importance_weights([0.5], [0.0])


def test_clipping_lowers_variance_and_is_reported():
    rng = np.random.default_rng(4)
    plain, clipped = [], []
    for _ in range(200):
        x, a, r = _draw(500, rng)
        w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
        plain.append(ips(r, w))
        clipped.append(ips(r, w, clip=3.0))
    p = np.array([e.value for e in plain])
    c = np.array([e.value for e in clipped])
    assert c.var() < 0.5 * p.var(), (c.var(), p.var())
    assert c.mean() < p.mean()  # the price: a bias towards the logged (low) rewards
    last = clipped[-1]
    assert last.clip == 3.0 and plain[-1].clip is None and plain[-1].n_clipped == 0
    assert last.n_clipped == int((w > 3.0).sum()) > 0
    assert last.max_weight == pytest.approx(w.max()) and w.max() > 3.0
    assert last.ess > plain[-1].ess
    assert last.as_dict()["clip"] == 3.0
    with pytest.raises(ValueError, match="clip"):
        ips(r, w, clip=0.0)


def test_slot_level_estimates_on_a_position_based_bandit():
    """Lists of 4 slots, each item drawn per slot; slot k is examined with theta[k] and then clicked with
    Q[x, item]: the target's value per list is sum_k theta[k] sum_a pi_tgt(a|x) Q[x, a] (item-position
    model)."""
    theta = np.array([1.0, 0.6, 0.4, 0.3])
    n_lists, n_slots = 8000, len(theta)
    rng = np.random.default_rng(5)
    x = np.repeat(rng.integers(len(Q), size=n_lists), n_slots)
    position = np.tile(np.arange(n_slots), n_lists)
    request = np.repeat(np.arange(n_lists), n_slots)
    a = _categorical(PI_LOG[x], rng)
    r = (rng.random(len(x)) < theta[position] * Q[x, a]).astype(np.float64)
    true_per_list = float(np.mean(np.sum(PI_TGT * Q, axis=1)) * theta.sum())
    w = importance_weights(PI_TGT[x, a], PI_LOG[x, a])
    for est in (ips(r, w, lists=request), snips(r, w, lists=request),
                ips(r, w, lists=request, interval="bootstrap", n_boot=300)):
        assert est.n == len(r) and est.n_lists == n_lists
        assert abs(est.per_list - true_per_list) < 0.05, (est.method, est.per_list, true_per_list)
        lo, hi = est.per_list_ci
        assert lo < true_per_list < hi
    assert abs(r.sum() / n_lists - true_per_list) > 0.5
    # the interval resamples whole lists: slots of one list share their context and are not independent
    shared = np.repeat((rng.random(n_lists) < 0.5).astype(float), n_slots)  # one outcome for the whole list
    ones = np.ones(len(shared))
    assert ips(shared, ones, lists=request).std_error > 1.5 * ips(shared, ones).std_error


def test_list_level_estimates():
    """Ordered pairs of distinct arms from 4: a list's probability under a Plackett-Luce policy is exact."""
    q = Q[:, :4]
    lists = np.array(list(itertools.permutations(range(4), 2)))  # [12, 2]
    theta = np.array([1.0, 0.5])

    def pl(weights):  # [C, 12] P(list) = w_a / sum w * w_b / (sum w - w_a)
        s = weights.sum(axis=1, keepdims=True)
        first, second = weights[:, lists[:, 0]], weights[:, lists[:, 1]]
        return first / s * second / (s - first)

    p_log, p_tgt = pl(np.exp(-2 * q)), pl(np.exp(3 * q))
    value = (q[:, lists] * theta).sum(axis=2)  # [C, 12] expected clicks of each list
    true = float(np.mean(np.sum(p_tgt * value, axis=1)))
    rng = np.random.default_rng(6)
    n = 20_000
    x = rng.integers(len(q), size=n)
    li = _categorical(p_log[x], rng)
    r = (rng.random((n, 2)) < theta * q[x[:, None], lists[li]]).sum(axis=1).astype(float)
    w = importance_weights(p_tgt[x, li], p_log[x, li])
    dm = np.sum(p_tgt * value, axis=1)[x]
    for est in (ips(r, w), snips(r, w), doubly_robust(r, w, value[x, li], dm)):
        assert abs(est.value - true) < 0.03, (est.method, est.value, true)
        assert est.ci_low < true < est.ci_high
    assert abs(r.mean() - true) > 0.3


# ---------------------------------------------------------------- epsilon-greedy propensities


class _FixedScores(Recommender):
    """The same scores for every history: item i scores -i (item 0 best)."""

    name = "fixed"

    def __init__(self, n_items: int):
        self.catalog = Catalog.from_ids([f"i{k}" for k in range(n_items)])

    def fit(self, train, catalog, valid=None):
        return self

    def score(self, histories, actions=None):
        return np.tile(-np.arange(len(self.catalog), dtype=np.float32), (len(histories), 1))


def test_epsilon_greedy_propensities_are_exact():
    model = _FixedScores(8)
    policy = EpsilonGreedyPolicy(model, epsilon=0.4, pool=5, seed=0)
    n, draws = 3, 40_000
    histories = [np.array([7], dtype=np.int64)] * draws  # item 7 is history: never shown
    actions = [np.array(["purchase"], dtype=object)] * draws
    lists = policy(histories, actions, n)
    assert not (lists.items == 7).any()
    assert len({tuple(x) for x in lists.items.tolist()}) > 20  # it explores
    # the logged propensity of each shown item is its exact probability there ...
    assert np.allclose(lists.propensities, policy.probabilities(histories, actions, lists.items))
    # ... which is what the draws show: (1 - eps) on the greedy item, eps / M on each of the pool of M = 5
    for k in range(n):
        freq = np.bincount(lists.items[:, k], minlength=8) / draws
        expected = np.array([0.4 / 5] * 5 + [0, 0, 0])
        expected[k] += 0.6
        assert np.allclose(freq, expected, atol=0.01), (k, freq)
    items, probs = policy.support(histories[:2], actions[:2], n)
    assert items[0].tolist() == [0, 1, 2, 3, 4] and np.allclose(probs.sum(axis=2), 1)
    assert np.allclose(probs[0, 1], [0.08, 0.68, 0.08, 0.08, 0.08])
    # position k: 0.6 k + 0.08 (0 + 1 + 2 + 3 + 4)
    assert np.allclose(direct_method(probs, np.tile(np.arange(5.0), (2, 1))), [[0.8, 1.4, 2.0]] * 2)
    # whole lists: the greedy list, or any ordered 3 of the pool of 5 (5 * 4 * 3 = 60 of them)
    two = np.array([[0, 1, 2], [4, 0, 3]])
    assert np.allclose(policy.list_probabilities(histories[:2], actions[:2], two), [0.6 + 0.4 / 60, 0.4 / 60])
    assert policy.list_probabilities(histories[:1], actions[:1], np.array([[0, 0, 1]]))[0] == 0
    greedy = EpsilonGreedyPolicy(model, epsilon=0.0)
    assert greedy.probabilities(histories[:1], actions[:1], two[1:]).tolist() == [[0.0, 0.0, 0.0]]
    assert greedy(histories[:1], actions[:1], n).propensities.tolist() == [[1.0, 1.0, 1.0]]


# ---------------------------------------------------------------- end to end on the simulator


class _FutureFirst(Recommender):
    """A base recommender with each simulated user's real future item put first: a logging policy that often
    finds what the user wants, so its logged reward is far from a plain model's."""

    name = "future-first"

    def __init__(self, base: Recommender, users):
        self.base, self.catalog = base, base.catalog
        self.future = {tuple(u.history.tolist()): int(u.future[0]) for u in users}

    def fit(self, train, catalog, valid=None):
        return self

    def score(self, histories, actions=None):
        s = np.array(self.base.score(histories, actions), dtype=np.float32, copy=True)
        for row, h in enumerate(histories):
            f = self.future.get(tuple(np.asarray(h).tolist()))
            if f is not None:
                s[row, f] = s[row].max() + 1
        return s


@pytest.fixture(scope="module")
def beauty():
    path = DATA / "amazon-beauty"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    ds = load_dataset(path)
    keep = ds.events["user_id"].drop_duplicates().iloc[:3000]
    events = ds.events[ds.events["user_id"].isin(keep)].reset_index(drop=True)
    return ds.catalog, events, leave_one_out(events)


@pytest.fixture(scope="module")
def logged(beauty):
    """One request per user (sessions of one list: a later request's context would depend on the policy that
    answered the first, which a per-request estimator does not model), logged epsilon-greedy."""
    catalog, _, split = beauty
    sim = Simulator(catalog, split.train, SimulatorConfig(max_requests=1))
    users = users_from_split(split)
    cooc = build("cooccurrence").fit(split.train, catalog)
    recorded = RecordingPolicy(EpsilonGreedyPolicy(_FutureFirst(cooc, users), epsilon=0.5, pool=12, seed=0))
    log = sim.run(recorded, users, seed=1)
    return sim, users, cooc, recorded, log


def test_slot_level_estimate_on_the_simulator_matches_the_simulated_value(beauty, logged):
    catalog, _, _ = beauty
    sim, users, cooc, recorded, log = logged
    contexts = recorded.contexts(log.impressions, catalog)
    rewarded = log.rewarded()
    target = EpsilonGreedyPolicy(cooc, epsilon=0.0, pool=12)  # the plain model, served greedily
    table = slot_table(rewarded, contexts, target, catalog)
    assert len(table) == len(rewarded) == 10 * len(users)
    assert set(np.unique(table["p_tgt"])) <= {0.0, 1.0}
    assert np.array_equal(table["p_log"], np.concatenate([imp.propensities for imp in log.impressions]))
    # a reward model for DR: the mean logged reward of each position (whatever the item)
    by_position = table.groupby("position")["reward"].mean()
    table["r_hat"] = table["r_hat_target"] = by_position.reindex(table["position"]).to_numpy()
    est = estimate_slots(table)
    # the target's real value: simulated, on other seeds than the log's
    runs = [impression_rewards(sim.run(target, users, seed=s).rewarded())["reward"].to_numpy()
            for s in (11, 12)]
    sim_value = float(np.mean([r.mean() for r in runs]))
    sim_se = float(np.sqrt(np.mean([r.var(ddof=1) / len(r) for r in runs]) / len(runs)))
    logged_value = float(impression_rewards(rewarded)["reward"].mean())
    for name, e in est.items():
        lo, hi = e.per_list_ci
        assert lo < sim_value < hi, (name, e.per_list, (lo, hi), sim_value)
        se = e.std_error * e.n / e.n_lists
        assert abs(e.per_list - sim_value) < 2.5 * np.hypot(se, sim_se), (name, e.per_list, sim_value)
        assert 0 < e.ess < e.n
        assert abs(logged_value - sim_value) > 3 * (hi - lo) / 2  # the naive logged mean is far off


def test_contexts_from_the_store_match_the_recorded_ones_and_the_gate_estimate(beauty, logged):
    catalog, events, split = beauty
    _, users, cooc, recorded, log = logged
    recorded_ctx = recorded.contexts(log.impressions, catalog)
    # the store knows events, not policy calls: each user's events before the test target
    length = {u: len(h) for u, h in zip(split.test.user_ids, split.test.histories, strict=True)}
    rank = events.groupby("user_id", sort=False).cumcount().to_numpy()
    limit = events["user_id"].map(length).fillna(-1).to_numpy()
    history_events = events[rank < limit].reset_index(drop=True)
    from_store = contexts_from_events(log.impressions, history_events, catalog)
    for rid in recorded_ctx:
        assert from_store[rid][0].tolist() == recorded_ctx[rid][0].tolist()
        assert from_store[rid][1].tolist() == recorded_ctx[rid][1].tolist()
    rewarded = log.rewarded()
    gate = estimate_candidate(cooc, rewarded, log.impressions, history_events, catalog)
    greedy = EpsilonGreedyPolicy(cooc, 0.0, pool=10)
    direct = estimate_slots(slot_table(rewarded, recorded_ctx, greedy, catalog))
    assert gate["estimate"] == pytest.approx(direct["snips"].value, abs=1e-9)
    assert gate["ess"] == pytest.approx(direct["snips"].ess)
    assert gate["logged"] == pytest.approx(rewarded["reward"].mean())
    assert gate["n_lists"] == len(users)


def test_deterministic_serving_gives_no_estimate(beauty, logged):
    catalog, events, split = beauty
    sim, users, cooc, _, _ = logged
    few = users[:300]
    popularity = build("popularity").fit(split.train, catalog)
    # propensities not logged at all: refused with the reason
    plain = sim.run(RecommenderPolicy(popularity), few, seed=2)
    with pytest.raises(ValueError, match="without propensities"):
        slot_table(plain.rewarded(), {}, EpsilonGreedyPolicy(cooc, 0.0), catalog)
    # logged as deterministic (p = 1) and a different deterministic candidate: ESS 0, no estimate
    recorded = RecordingPolicy(EpsilonGreedyPolicy(popularity, epsilon=0.0))
    log = sim.run(recorded, few, seed=2)
    table = slot_table(log.rewarded(), recorded.contexts(log.impressions, catalog),
                       EpsilonGreedyPolicy(cooc, 0.0), catalog)
    with pytest.raises(NoOverlapError, match="deterministically"):
        estimate_slots(table)
    gate = estimate_candidate(cooc, log.rewarded(), log.impressions, events, catalog)
    assert gate["ess"] == 0.0 and np.isnan(gate["estimate"]) and "deterministically" in gate["reason"]
    assert isinstance(gate["logged"], float) and not pd.isna(gate["logged"])
