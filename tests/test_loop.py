"""The feedback loop on a slice of real Beauty users: logs from the simulator, a tiny model, a real registry
and store. Promotion, the gate's refusal, rollback, interrupted rounds and the triggers."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import shared_dataset

from dragonrec.data.readers import load_dataset
from dragonrec.data.splits import leave_one_out
from dragonrec.evaluate.simulator import RecommenderPolicy, Simulator, split_users, users_from_split
from dragonrec.loop import FeedbackLoop, GateConfig, LoopConfig, LoopError
from dragonrec.recommenders import build
from dragonrec.registry import Registry
from dragonrec.store import Store

TINY = {"hidden_size": 32, "num_layers": 1, "max_len": 20, "max_epochs": 3, "eval_every": 1, "batch_size": 64,
        "progress": False, "quiet": True, "max_minutes": None, "refit_with_valid": False, "lr": 5e-3}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ds = load_dataset(shared_dataset("amazon-beauty"))
    keep = ds.events["user_id"].drop_duplicates().iloc[:1200]
    events = ds.events[ds.events["user_id"].isin(keep)].reset_index(drop=True)
    split = leave_one_out(events)
    model = build("sasrec", TINY).fit(split.train, ds.catalog, valid=split.valid)
    users = users_from_split(split, start="valid")
    feedback, held_out = split_users(users, 0.5, seed=0)
    held = {u.user_id for u in held_out}
    gate_cases = split.valid.subset(np.asarray([u in held for u in split.valid.user_ids]))
    sim = Simulator(ds.catalog, split.train)
    log = sim.run(RecommenderPolicy(model, "v0001"), feedback, seed=0)
    root = tmp_path_factory.mktemp("world")
    model.save(root / "base")
    return {"catalog": ds.catalog, "split": split, "gate": gate_cases, "log": log, "base": root / "base"}


def _loop(world, tmp_path, **cfg) -> tuple[FeedbackLoop, Registry, Store]:
    reg = Registry(tmp_path / "registry")
    v = reg.register(world["base"], method="sft", activate=True)
    assert v.version == "v0001"
    store = Store.open(tmp_path / "store.db", items=world["catalog"])
    store.write(events=world["log"].events, impressions=world["log"].impressions)
    loop = FeedbackLoop(reg, store, world["catalog"], world["split"].train, world["gate"],
                        LoopConfig(**cfg), quiet=True)
    return loop, reg, store


def test_a_round_promotes_a_version_with_its_lineage_and_rollback_restores(world, tmp_path):
    loop, reg, store = _loop(world, tmp_path, method="sft", gate=GateConfig(max_ndcg_drop=1.0, off_policy="off"))
    result = loop.run_round()
    assert result.status == "promoted", result.reason
    assert reg.active_version() == result.version == "v0002"
    info = reg.get("v0002").info
    assert info.parent == "v0001" and info.method == "sft"
    assert info.data_window.n_events == len(world["log"].events)
    gate = info.metrics["gate"]
    assert gate["passed"] and gate["candidate_ndcg@10"] >= 0 and gate["gate_cases"] == len(world["gate"])
    assert result.train["sequences"] > 0
    # the candidate really changed: its weights differ from its parent's
    a = reg.get("v0001").weights[0].read_bytes()
    b = reg.get("v0002").weights[0].read_bytes()
    assert a != b
    # the logs are consumed: the next round has nothing new
    assert loop.run_round().status == "skipped"
    assert loop.rollback() == "v0001" and reg.active_version() == "v0001"
    st = loop.status()
    assert st["rounds"] == 2 and st["last_round"]["status"] == "skipped"
    store.close()


def test_the_gate_refuses_a_worse_model_and_keeps_the_active_version(world, tmp_path):
    # A learning rate of 5 wrecks the model; a zero margin forbids any loss of held-out NDCG.
    loop, reg, store = _loop(world, tmp_path, method="sft", method_config={"lr": 5.0, "max_epochs": 2},
                             gate=GateConfig(max_ndcg_drop=0.0, off_policy="off"))
    result = loop.run_round()
    assert result.status == "refused", result.reason
    assert result.gate["candidate_ndcg@10"] < result.gate["active_ndcg@10"]
    assert "held-out NDCG@10" in result.reason
    assert reg.active_version() == "v0001" and [v.version for v in reg.list()] == ["v0001"]
    store.close()


@pytest.mark.parametrize("step", ["collect", "train", "gate"])
def test_an_interrupted_round_changes_nothing(world, tmp_path, step):
    loop, reg, store = _loop(world, tmp_path, method="sft", gate=GateConfig(max_ndcg_drop=1.0, off_policy="off"))
    with pytest.raises(RuntimeError, match="interrupted"):
        loop.run_round(fail_after=step)
    assert reg.active_version() == "v0001" and len(reg.list()) == 1
    state = json.loads(loop.state_path.read_text())
    assert state["events_cursor"] == 0 and state["rounds"][-1]["status"] == "failed"
    assert not any((reg.root / ".tmp").glob("*"))  # no half-written version left behind
    # the next round sees the same logs and can promote
    again = loop.run_round()
    assert again.status == "promoted" and again.data["new_events"] == len(world["log"].events)
    store.close()


def test_off_policy_gate_refuses_without_logged_propensities_when_required(world, tmp_path):
    loop, reg, store = _loop(world, tmp_path, method="sft",
                             gate=GateConfig(max_ndcg_drop=1.0, off_policy="require"))
    result = loop.run_round()
    assert result.status == "refused" and "no logged propensities" in result.reason
    assert reg.active_version() == "v0001"
    store.close()


def test_triggers_and_errors(world, tmp_path):
    loop, _, store = _loop(world, tmp_path, method="sft", gate=GateConfig(max_ndcg_drop=1.0, off_policy="off"))
    # after_events: the stored events already exceed the threshold, so one round runs at once
    stop = threading.Event()
    results = loop.run(after_events=10, max_rounds=1, stop=stop, poll_s=0.01)
    assert [r.status for r in results] == ["promoted"]
    with pytest.raises(ValueError):
        LoopConfig(method="nope")
    empty = FeedbackLoop(tmp_path / "empty-registry", store, world["catalog"], world["split"].train, world["gate"],
                         LoopConfig(method="sft"), quiet=True)
    with pytest.raises(LoopError, match="no active version"):
        empty.load_active()
    store.close()


@pytest.mark.parametrize("method", ["dpo", "sdpo", "pg"])
def test_preference_methods_run_a_round(world, tmp_path, method):
    """Each method trains a candidate from the logged feedback and goes through the gate (promoted here: the
    gate only asks it not to lose more than all of the held-out NDCG)."""
    from dragonrec.evaluate.simulator import Simulator

    sim = Simulator(world["catalog"], world["split"].train)
    by_history = {tuple(u.history.tolist()): u for u in users_from_split(world["split"], start="valid")}

    def reward_fn(histories, actions, lists):  # the simulator's expected reward for the users we know
        out = np.zeros(np.asarray(lists).shape)
        for b, h in enumerate(histories):
            u = next((by_history[k] for k in (tuple(h[:n].tolist()) for n in range(len(h), 0, -1))
                      if k in by_history), None)
            if u is not None:
                out[b] = sim.expected_rewards([u], np.asarray(lists)[b:b + 1])[0]
        return out

    cfg = {"lr": 1e-3, "epochs": 1, "max_steps": 3, "quiet": True} | ({"group_size": 4, "batch_size": 8} if method == "pg" else {})
    loop, reg, store = _loop(world, tmp_path, method=method, method_config=cfg,
                             gate=GateConfig(max_ndcg_drop=1.0, off_policy="off"))
    loop.reward_fn = reward_fn
    result = loop.run_round()
    assert result.status == "promoted", result.reason
    assert result.data["records"] >= 8 and result.train["steps"] >= 1
    assert reg.get(result.version).info.method == method
    store.close()


def test_off_policy_gate_compares_candidate_and_active_from_exploring_logs(world, tmp_path):
    """Served epsilon-greedily (propensities logged), the gate estimates both versions from the same logs."""
    from dragonrec.evaluate.off_policy import EpsilonGreedyPolicy

    catalog, split = world["catalog"], world["split"]
    reg = Registry(tmp_path / "registry")
    reg.register(world["base"], method="sft", activate=True)
    base = FeedbackLoop(reg, None, catalog, split.train, world["gate"], quiet=True).load_active()[1]
    users = split_users(users_from_split(split, start="valid"), 0.5, seed=0)[0][:300]
    log = Simulator(catalog, split.train).run(EpsilonGreedyPolicy(base, epsilon=0.5, pool=20, seed=1), users,
                                              seed=1)
    assert any(p < 1 for imp in log.impressions for p in imp.propensities)
    store = Store.open(tmp_path / "store.db", items=catalog)
    store.write(events=log.events, impressions=log.impressions)
    loop = FeedbackLoop(reg, store, catalog, split.train, world["gate"],
                        LoopConfig(method="sft", gate=GateConfig(max_ndcg_drop=1.0, off_policy="require", min_ess=1)),
                        quiet=True)
    result = loop.run_round()
    g = result.gate
    # a share of the users is kept out of training and only estimated on
    n_est = result.data["estimate_impressions"]
    assert 0 < n_est < len(log.impressions) and g["off_policy"]["n_lists"] <= n_est
    assert g["off_policy"]["ess"] > 1 and g["off_policy_active"]["ess"] > 1
    assert np.isfinite(g["off_policy"]["estimate"]) and np.isfinite(g["off_policy_active"]["estimate"])
    assert g["ope_ok"] == (g["off_policy"]["estimate"] > g["off_policy_active"]["estimate"])
    assert result.status == ("promoted" if g["ope_ok"] else "refused")
    store.close()


def test_held_out_users_never_feed_a_round(world, tmp_path):
    loop, reg, store = _loop(world, tmp_path, method="sft", gate=GateConfig(max_ndcg_drop=1.0, off_policy="off"))
    loop.holdout_users = frozenset(world["log"].events["user_id"].astype(str))  # every user of the logs
    result = loop.run_round()
    assert result.status == "skipped" and result.data["new_events"] == 0
    assert reg.active_version() == "v0001"
    store.close()


def test_a_skipped_round_leaves_its_logs_for_the_next(world, tmp_path):
    """Too few events for a round: skipped, and those events stay pending (they are not lost to training)."""
    loop, reg, store = _loop(world, tmp_path, method="sft", min_new_events=10 ** 9,
                             gate=GateConfig(max_ndcg_drop=1.0, off_policy="off"))
    first = loop.run_round()
    assert first.status == "skipped" and loop.state()["events_cursor"] == 0
    assert reg.active_version() == "v0001"
    loop.cfg = loop.cfg.model_copy(update={"min_new_events": 1})
    again = loop.run_round()
    assert again.status == "promoted" and again.data["new_events"] == len(world["log"].events)
    store.close()
