"""The feedback loop inside a running shop: visitors' feedback through the API, a round on POST /v1/loop/run,
the new version promoted and served, held-out users kept out of training, rollback."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient
from serve_helpers import API_KEY, beauty_slice, train_tiny

from dragonrec.loop import holdout_users
from dragonrec.registry import Registry
from dragonrec.serve import Settings, create_app

KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop-shop")
    data = beauty_slice(root / "data", n_items=400, max_users=1500)
    reg = Registry(root / "state" / "registry")
    reg.register(train_tiny(data, root / "tiny"), method="sft", activate=True)
    settings = Settings(data_dir=data, state_dir=root / "state", api_keys=[API_KEY], reload_interval_s=0.2,
                        loop_method="sft", loop_min_new_events=5, loop_max_ndcg_drop=1.0, loop_holdout_share=0.3)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.service, reg


def _wait_round(client, before: int, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get("/v1/loop/status", headers=KEY).json()
        if not st["running"] and len(st["detail"].get("rounds", [])) > before:
            return st
        time.sleep(0.5)
    raise AssertionError(f"no round finished in {timeout} s: {st}")


def test_a_round_learns_from_the_shops_feedback_and_the_service_serves_it(shop):
    client, service, reg = shop
    st = client.get("/v1/loop/status", headers=KEY).json()
    assert st["configured"] and not st["running"]
    # shoppers: not held out, so their feedback may train the next version
    held = holdout_users(service.events["user_id"].unique(), 0.3)
    shoppers = [u for u in service.events["user_id"].unique() if u not in held][:40]
    events = []
    for u in shoppers:
        rec = client.post("/v1/recommend", json={"user_id": u, "n": 5}).json()
        first, rest = rec["items"][0]["item_id"], [x["item_id"] for x in rec["items"][1:]]
        events += [{"event_id": uuid.uuid4().hex, "user_id": u, "item_id": first, "action": "click",
                    "request_id": rec["request_id"]},
                   {"event_id": uuid.uuid4().hex, "user_id": u, "item_id": first, "action": "purchase",
                    "request_id": rec["request_id"]}]
        events += [{"event_id": uuid.uuid4().hex, "user_id": u, "item_id": i, "action": "scroll_past",
                    "request_id": rec["request_id"]} for i in rest]
    for s in range(0, len(events), 100):
        r = client.post("/v1/events", json={"events": events[s:s + 100]}, headers=KEY)
        assert r.status_code == 200, r.text
    r = client.post("/v1/loop/run", headers=KEY)
    assert r.status_code == 202, r.text
    st = _wait_round(client, 0)
    last = st["detail"]["rounds"][-1]
    assert last["status"] == "promoted", last["reason"]
    assert last["heldout_ndcg"] is not None and last["reward"] is not None
    assert reg.active_version() == last["version"] == "v0002"
    info = reg.get("v0002").info
    assert info.parent == "v0001" and info.method == "sft"
    # the held-out users' last events are the gate, never training data
    assert info.metrics["gate"]["gate_cases"] > 0
    # the service swaps to the promoted version without a restart
    deadline = time.monotonic() + 60
    while service.model_version != "v0002" and time.monotonic() < deadline:
        time.sleep(0.2)
    rec = client.post("/v1/recommend", json={"user_id": shoppers[0], "n": 5}).json()
    assert rec["model_version"] == "v0002"
    # nothing new since: the next round is skipped; rollback is one call
    client.post("/v1/loop/run", headers=KEY)
    st = _wait_round(client, 1)
    assert st["detail"]["rounds"][-1]["status"] == "skipped"
    r = client.post("/v1/models/rollback", headers=KEY, params={"wait": "true"})
    assert r.status_code == 200, r.text
    assert reg.active_version() == "v0001"


def test_held_out_users_are_stable_across_processes_and_orders():
    users = [f"user-{i}" for i in range(2000)]
    a, b = holdout_users(users, 0.1), holdout_users(list(reversed(users)), 0.1)
    assert a == b and 120 < len(a) < 280  # about 10%, the same whatever the order


def test_explore_logs_exact_slot_probabilities():
    from types import SimpleNamespace

    import numpy as np

    from dragonrec.serve.service import explore

    ranked = [SimpleNamespace(item_id=f"i{k}") for k in range(30)]
    greedy = ranked[:5]
    assert explore(greedy, ranked, 0.0, 20) == (greedy, [1.0] * 5)  # no exploration: deterministic
    assert explore(greedy, ranked[:5], 0.5, 20) == (greedy, [1.0] * 5)  # a pool no bigger than the list
    rng = np.random.default_rng(0)
    counts: dict[tuple[int, str], int] = {}
    trials = 20_000
    for _ in range(trials):
        shown, props = explore(greedy, ranked, 0.3, 20, rng)
        for k, (r, p) in enumerate(zip(shown, props)):
            counts[(k, r.item_id)] = counts.get((k, r.item_id), 0) + 1
            assert p == pytest.approx(0.7 * (r.item_id == greedy[k].item_id) + 0.3 / 20)
    # the logged probabilities are the real frequencies
    assert counts[(0, "i0")] / trials == pytest.approx(0.7 + 0.3 / 20, abs=0.01)
    assert counts[(2, "i17")] / trials == pytest.approx(0.3 / 20, abs=0.004)
    assert (0, "i25") not in counts  # outside the pool: never shown


@pytest.mark.parametrize("explore", [{"explore_epsilon": 0.5}, {"explore_slots": 2, "explore_share": 0.5}],
                         ids=["epsilon-greedy", "thompson-bandit"])
def test_an_exploring_shop_lets_the_gate_estimate_off_policy(tmp_path, explore):
    data = beauty_slice(tmp_path / "data", n_items=300, max_users=800)
    reg = Registry(tmp_path / "state" / "registry")
    reg.register(train_tiny(data, tmp_path / "tiny"), method="sft", activate=True)
    settings = Settings(data_dir=data, state_dir=tmp_path / "state", api_keys=[API_KEY], **explore,
                        explore_pool=20, loop_method="sft", loop_min_new_events=5, loop_max_ndcg_drop=1.0,
                        loop_holdout_share=0.2)
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service
        held = holdout_users(service.events["user_id"].unique(), 0.2)
        users = [u for u in service.events["user_id"].unique() if u not in held][:60]
        events = []
        for u in users:
            rec = client.post("/v1/recommend", json={"user_id": u, "n": 5}).json()
            imp = service.store.impression(rec["request_id"])
            assert all(0 < p <= 1 for p in imp.propensities) and any(p < 1 for p in imp.propensities)
            first = rec["items"][0]["item_id"]
            events += [{"event_id": uuid.uuid4().hex, "user_id": u, "item_id": first, "action": "click",
                        "request_id": rec["request_id"]}]
            events += [{"event_id": uuid.uuid4().hex, "user_id": u, "item_id": x["item_id"],
                        "action": "scroll_past", "request_id": rec["request_id"]} for x in rec["items"][1:]]
        for s in range(0, len(events), 100):
            assert client.post("/v1/events", json={"events": events[s:s + 100]}, headers=KEY).status_code == 200
        client.post("/v1/loop/run", headers=KEY)
        last = _wait_round(client, 0)["detail"]["rounds"][-1]
        assert last["status"] in ("promoted", "refused"), last
        gate = reg.get(last["version"]).info.metrics["gate"] if last["version"] else None
        state = service.loop.loop.state()["rounds"][-1]
        assert "off_policy" in state["gate"] and "off_policy_active" in state["gate"], state["gate"]
        assert state["data"]["estimate_impressions"] > 0
        assert gate is None or gate["passed"]
