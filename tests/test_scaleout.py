"""Scale-out: two API processes (real uvicorn servers) over one PostgreSQL store, one registry and one state
directory, as several stateless workers behind a load balancer run. What one is told, the other knows:
events, products, and the active model version (after its registry watch interval); and both answer the same
user with the same list (explore off)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
from conftest_pg import postgres_admin_url, postgres_url  # noqa: F401 (fixtures)
from serve_helpers import API_KEY, Server, beauty_slice, train_tiny

from dragonrec.registry import Registry

KEY = {"X-API-Key": API_KEY}


def wait_for(predicate, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def items_of(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [i["item_id"] for i in r.json()["items"]]


def test_two_api_processes_over_one_store_and_registry_agree(tmp_path, postgres_url):  # noqa: F811
    data = beauty_slice(tmp_path / "data", n_items=200, max_users=300)
    reg = Registry(tmp_path / "registry")
    model = train_tiny(data, tmp_path / "model")
    v1 = reg.register(model, method="sft", activate=True).version
    v2 = reg.register(model, method="dpo", parent=v1).version
    env = {"DRAGONREC_DATA_DIR": str(data), "DRAGONREC_STATE_DIR": str(tmp_path / "state"),
           "DRAGONREC_STORE_URL": postgres_url, "DRAGONREC_REGISTRY_DIR": str(reg.root),
           "DRAGONREC_API_KEY": API_KEY, "DRAGONREC_RELOAD_INTERVAL_S": "0.2", "DRAGONREC_EXPLORE_EPSILON": "0"}
    servers = [Server(env, tmp_path / f"worker{k}.log") for k in (1, 2)]
    with ThreadPoolExecutor(2) as pool:  # both start at once, as workers behind a balancer do
        list(pool.map(Server.__enter__, servers))
    try:
        a, b = (httpx.Client(base_url=s.url, timeout=30) for s in servers)
        for c in (a, b):
            h = c.get("/health").json()
            assert h["store"] == "postgresql" and h["model_version"] == v1
        items = pd.read_parquet(data / "items.parquet")["item_id"].astype(str).tolist()

        # events sent to one are seen by the other, at once (the store is the only state)
        user = f"u-{uuid.uuid4().hex[:8]}"
        events = [{"event_id": f"{user}-{k}", "user_id": user, "item_id": items[k], "action": action}
                  for k, action in enumerate(["view", "click", "add_to_cart"])]
        assert a.post("/v1/events", json={"events": events}, headers=KEY).json() == {"accepted": 3, "duplicates": 0}
        seen = b.get(f"/v1/users/{user}/history", headers=KEY).json()["events"]
        assert [(e["item_id"], e["action"]) for e in seen] == [(e["item_id"], e["action"]) for e in events]
        # a retry that lands on the other worker is a duplicate, not a second event
        assert b.post("/v1/events", json={"events": events}, headers=KEY).json() == {"accepted": 0, "duplicates": 3}

        # both answer the same user with the same list: a dataset user, and the new one whose events went to a
        dataset_user = str(pd.read_parquet(data / "interactions.parquet")["user_id"].iloc[0])
        for u in (dataset_user, user):
            body = {"user_id": u, "n": 10}
            first = items_of(a.post("/v1/recommend", json=body))
            assert items_of(b.post("/v1/recommend", json=body)) == first and len(first) == 10
        assert not set(items_of(b.post("/v1/recommend", json={"user_id": user, "n": 10}))) & set(items[:3])

        # a product added through one is accepted and found by the other within the watch interval
        new = {"item_id": "SCALE-NEW-1", "title": "Cedar and vetiver beard oil", "category": "Beauty > Men"}
        assert a.post("/v1/items", json=new, headers=KEY).status_code == 201
        wait_for(lambda: b.get("/v1/items/SCALE-NEW-1").status_code == 200, what="the product on worker 2")
        ev = {"user_id": user, "item_id": "SCALE-NEW-1", "action": "view"}
        assert b.post("/v1/events", json={"events": [ev]}, headers=KEY).json()["accepted"] == 1

        # a version activated through one is served by both after their watch interval
        r = a.post(f"/v1/models/{v2}/activate", params={"wait": "true"}, headers=KEY)
        assert r.status_code == 200, r.text
        assert a.get("/health").json()["model_version"] == v2
        wait_for(lambda: b.get("/health").json()["model_version"] == v2, what=f"worker 2 serving {v2}")
        body = {"user_id": dataset_user, "n": 10}
        ra, rb = a.post("/v1/recommend", json=body).json(), b.post("/v1/recommend", json=body).json()
        assert ra["model_version"] == rb["model_version"] == v2
        assert [i["item_id"] for i in ra["items"]] == [i["item_id"] for i in rb["items"]]
        # and a rollback through the other one reaches the first
        assert b.post("/v1/models/rollback", params={"wait": "true"}, headers=KEY).status_code == 200
        wait_for(lambda: a.get("/health").json()["model_version"] == v1, what=f"worker 1 back on {v1}")
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    for s in servers:
        assert "Traceback" not in s.log_path.read_text(errors="replace"), s.log()

