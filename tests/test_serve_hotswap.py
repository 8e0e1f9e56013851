"""Hot swap under load: a real server on loopback answers concurrent requests while model versions are
activated, fail to load and are rolled back; no request fails and the responses' version follows."""

from __future__ import annotations

import itertools
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import chain_events, chain_items
from serve_helpers import API_KEY, Server, beauty_slice, train_tiny

from dragonrec.registry import Registry
from dragonrec.serve import Service, Settings
from dragonrec.serve.schemas import EventIn, ItemIn, RecommendRequest
from dragonrec.store import Store

KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hotswap")
    data = beauty_slice(root / "data", n_items=500, max_users=2000)
    reg = Registry(root / "registry")
    # Two versions of one tiny model (training a second one would only add time: the swap is the same).
    model = train_tiny(data, root / "m1")
    v1 = reg.register(model, method="sft", activate=True)
    v2 = reg.register(model, method="dpo", parent=v1.version)
    # A version trained on another catalog: it cannot serve this shop, and its load must fail harmlessly.
    chain = root / "chain"
    chain.mkdir()
    chain_items().to_parquet(chain / "items.parquet")
    chain_events().to_parquet(chain / "interactions.parquet")
    v3 = reg.register(train_tiny(chain, root / "m3"), method="sft", parent=v2.version)
    return {"root": root, "data": data, "registry": reg, "model": model,
            "versions": (v1.version, v2.version, v3.version)}


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_versions_swap_under_load_without_a_failed_request(setup):
    root, reg = setup["root"], setup["registry"]
    v1, v2, v3 = setup["versions"]
    env = {"DRAGONREC_DATA_DIR": str(setup["data"]), "DRAGONREC_STATE_DIR": str(root / "state"),
           "DRAGONREC_REGISTRY_DIR": str(reg.root), "DRAGONREC_API_KEY": API_KEY,
           "DRAGONREC_RELOAD_INTERVAL_S": "0.1"}
    users = [f"user-{k}" for k in range(20)]  # cold users first; their events make them warm
    with Server(env, root / "server.log") as server, httpx.Client(base_url=server.url, timeout=30) as admin:
        assert admin.get("/health").json()["model_version"] == v1
        items = [i["item_id"] for i in admin.get("/v1/items", params={"limit": 40}).json()["items"]]
        events = [{"user_id": u, "item_id": items[(k * 3 + j) % len(items)], "action": "purchase"}
                  for k, u in enumerate(users) for j in range(3)]
        assert admin.post("/v1/events", json={"events": events}, headers=KEY).json()["accepted"] == len(events)

        stop = threading.Event()
        seen: list[list[tuple[str, str]]] = [[] for _ in range(8)]  # per client: (version, request_id)
        failures: list[str] = []

        def client(k: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                for n in itertools.count():
                    if stop.is_set() or n >= 2000:
                        return
                    try:
                        r = c.post("/v1/recommend", json={"user_id": users[(k + n) % len(users)], "n": 10})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}: {r.text[:200]}")
                        else:
                            seen[k].append((r.json()["model_version"], r.json()["request_id"]))
                    except httpx.HTTPError as e:
                        failures.append(repr(e))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(seen))]
        for t in threads:
            t.start()
        try:
            def serving() -> str:
                return admin.get("/health").json()["model_version"]

            wait_for(lambda: sum(map(len, seen)) >= 20, what="first answers")
            r = admin.post(f"/v1/models/{v2}/activate", headers=KEY)  # returns at once; loads in the background
            assert r.status_code == 200 and r.json()["active"] == v2
            wait_for(lambda: serving() == v2, what=f"{v2} to serve")
            n_before = sum(map(len, seen))
            wait_for(lambda: sum(map(len, seen)) >= n_before + 20, what="answers from v2")

            reg.activate(v3)  # another process (the loop) promotes a version this catalog cannot load
            wait_for(lambda: admin.get("/health").json()["status"] == "degraded", what="the failed load")
            health = admin.get("/health").json()
            assert health["model_version"] == v2 and health["active_version"] == v3
            assert health["load_error"]["version"] == v3 and "error" not in health["load_error"]  # open route
            models = admin.get("/v1/models", headers=KEY).json()
            assert models["serving"] == v2 and models["active"] == v3
            assert "trained on a catalog of 12 items" in models["load_error"]["error"]
            n_before = sum(map(len, seen))
            wait_for(lambda: sum(map(len, seen)) >= n_before + 20, what="answers after the failed load")

            assert admin.post("/v1/models/rollback", headers=KEY).json()["active"] == v2  # v3 -> v2: serving
            r = admin.post("/v1/models/rollback", params={"wait": "true"}, headers=KEY)  # v2 -> v1
            assert r.json() == {"active": v1, "serving": v1, "loading": None}
            assert admin.get("/health").json()["status"] == "ok"
            wait_for(lambda: admin.get("/health").json()["load_error"] is None, what="the old error to clear")
            n_before = sum(map(len, seen))
            wait_for(lambda: sum(map(len, seen)) >= n_before + 20, what="answers from v1 again")
        finally:
            stop.set()
            for t in threads:
                t.join()
        metrics = admin.get("/metrics").text

    assert failures == []
    versions = [v for per in seen for v, _ in per]
    assert set(versions) == {v1, v2} and versions.count(v2) >= 20
    for per in seen:  # each client sees the versions change in the order they were activated, never flapping
        runs = [v for v, _ in itertools.groupby(v for v, _ in per)]
        assert runs in ([v1, v2, v1], [v1, v2], [v2, v1], [v1], [v2]), runs
    assert 'dragonrec_model_loads_total{outcome="failed"} 1.0' in metrics
    assert f'dragonrec_model_version_info{{version="{v1}"}} 1.0' in metrics
    # Every answer's impression was stored with the version that made it.
    with Store.open(f"sqlite:///{root / 'state' / 'feedback.db'}") as store:
        answered = {rid: v for per in seen for v, rid in per}
        stored = {i.request_id: i.model_version for i in store.impressions(request_ids=list(answered))}
    assert stored == answered


def test_a_new_product_gets_a_place_in_a_model_scored_list(setup, tmp_path):
    """The model was fitted before the product existed and cannot score it; dense retrieval proposes it and
    the list gives it an exploration slot instead of sinking it below every scored candidate."""
    reg = Registry(tmp_path / "registry")
    reg.register(setup["model"], method="sft", activate=True)
    settings = Settings(data_dir=setup["data"], state_dir=tmp_path / "state", registry_dir=reg.root)
    with Service(settings) as service:
        assert service.model_version == "v0001" and "scorer=model:sasrec" in service.serving.label
        twin = service.popular(1)[0]
        service.add_item(ItemIn(item_id="NEW-TWIN", title=f"{twin['title']} (new edition)",
                                category=twin["category"], brand=twin["brand"]))
        assert service.model_version == "v0001"  # the same version, over the grown catalog
        # A visitor who states what they want: dense retrieval proposes the new edition.
        asked = RecommendRequest(user_id="visitor", n=10, context={"preferences": twin["title"]})
        assert "NEW-TWIN" in [i.item_id for i in service.recommend(asked).items]
        # A user who bought the twin: the model ranks the list from that history, and the new edition, which
        # it cannot score, gets the first exploration slot instead of sinking below all of it.
        service.ingest([EventIn(user_id="buyer", item_id=twin["item_id"], action="purchase")])
        got = service.recommend(RecommendRequest(user_id="buyer", n=10)).items
        assert [i.item_id for i in got].index("NEW-TWIN") == 2 and got[2].source == "dense"
        history = [np.asarray([service.catalog.index_of(twin["item_id"])])]
        model_scores = service.serving.pipeline.model.score(history, [np.asarray(["purchase"], dtype=object)])[0]
        others = [i for i in got if i.item_id != "NEW-TWIN"]
        assert [i.score for i in others] == pytest.approx(
            [float(model_scores[service.catalog.index_of(i.item_id)]) for i in others], rel=1e-5)
