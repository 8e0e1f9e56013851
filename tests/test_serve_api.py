"""The HTTP API over a real slice of Amazon Beauty (500 products, their real text and events): every route,
each kind of bad input, keys, idempotent events, online adaptation, new products, the storefront's routes,
and ingestion on PostgreSQL."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest_pg import postgres_admin_url, postgres_url  # noqa: F401 (fixtures)
from fastapi.testclient import TestClient
from serve_helpers import API_KEY, OLD_KEY, beauty_slice

from dragonrec.serve import Service, Settings, create_app
from dragonrec.serve.schemas import EventIn, ItemIn, ItemPatch
from dragonrec.serve.serving import replay_catalog_log

KEY = {"X-API-Key": API_KEY}
SHOP = "http://testserver"  # TestClient's own origin


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return beauty_slice(tmp_path_factory.mktemp("beauty") / "data", n_items=500)


def settings_for(data_dir: Path, state: Path, **kw) -> Settings:
    return Settings(data_dir=data_dir, state_dir=state, api_keys=[API_KEY, OLD_KEY], max_body_bytes=64 * 1024,
                    max_events_per_batch=100, reload_interval_s=0.2, **kw)


@pytest.fixture(scope="module")
def app(data_dir, tmp_path_factory):
    app = create_app(settings_for(data_dir, tmp_path_factory.mktemp("state")))
    with TestClient(app) as client:
        app.state.client = client
        yield app


@pytest.fixture
def client(app) -> TestClient:
    return app.state.client


@pytest.fixture
def service(app) -> Service:
    return app.state.service


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


def a_dataset_user(service: Service, min_events: int = 4) -> str:
    sizes = service.events.groupby("user_id").size()
    return str(sizes[sizes >= min_events].index[0])


def recommend(client, user: str, **body) -> dict:
    r = client.post("/v1/recommend", json={"user_id": user, **body})
    assert r.status_code == 200, r.text
    return r.json()


def post_events(client, *events: dict, headers=KEY):
    return client.post("/v1/events", json={"events": list(events)}, headers=headers)


# -- health, OpenAPI, metrics -------------------------------------------------------------------------------
def test_health_openapi_and_metrics(client, service):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_version"] == "popularity" and h["active_version"] is None
    assert h["catalog_items"] == 500 and h["store"] == "sqlite"
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/recommend", "/v1/events", "/v1/items", "/v1/items/{item_id}", "/v1/users/{user_id}/history",
                 "/v1/models", "/v1/models/{version}/activate", "/v1/models/rollback", "/v1/loop/run",
                 "/v1/loop/status", "/health", "/metrics", "/shop/events", "/shop/recommend"):
        assert path in paths, path
    assert set(paths["/v1/items/{item_id}"]) == {"get", "patch", "delete"}
    recommend(client, new_user())
    item = service.popular(1)[0]["item_id"]
    assert post_events(client, {"user_id": new_user(), "item_id": item, "action": "view"}).status_code == 200
    client.post("/v1/events", json={"events": []}, headers=KEY)  # a 422, counted as an error
    text = client.get("/metrics").text
    assert 'dragonrec_request_seconds_bucket{le="0.25",method="POST",route="/v1/recommend",status="200"}' in text
    assert 'dragonrec_request_errors_total{method="POST",route="/v1/events",status="422"}' in text
    assert 'dragonrec_model_version_info{version="popularity"} 1.0' in text
    assert 'dragonrec_events_ingested_total{action="all",route="/v1/events"}' in text
    assert "dragonrec_catalog_items" in text and API_KEY not in text
    # Where a recommend request's time went, stage by stage (one observation per stage and list).
    lists = [float(line.split()[-1]) for line in text.splitlines()
             if line.startswith('dragonrec_recommendations_total{')]
    for stage in ("history", "pipeline", "impression"):
        count = [float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith(f'dragonrec_recommend_stage_seconds_count{{stage="{stage}"}}')]
        assert count == [sum(lists)] and sum(lists) >= 1


# -- recommend ------------------------------------------------------------------------------------------------
def test_unknown_user_gets_a_cold_start_list_and_its_impression_is_stored(client, service):
    user = new_user()
    body = recommend(client, user, n=7, surface="home")
    assert body["cold"] is True and body["model_version"] == "popularity" and len(body["items"]) == 7
    assert all(i["source"] in ("popularity", "cold_start") and i["reason"] for i in body["items"])
    imp = service.store.impression(body["request_id"])
    assert imp.user_id == user and imp.item_ids == [i["item_id"] for i in body["items"]]
    assert imp.model_version == "popularity" and imp.pipeline.endswith("@home")
    assert imp.sources == [i["source"] for i in body["items"]] and imp.propensities == [1.0] * 7
    assert imp.scores == pytest.approx([i["score"] for i in body["items"]])


def test_a_known_users_list_follows_their_history_and_never_repeats_it(client, service):
    user = a_dataset_user(service)
    seen = {e["item_id"] for e in service.history(user)}
    body = recommend(client, user, n=10)
    got = [i["item_id"] for i in body["items"]]
    assert body["cold"] is False and len(got) == 10 and not seen & set(got)
    assert {i["source"] for i in body["items"]} <= {"dense", "cooccurrence", "popularity"}
    # The page's item and the cart are read as the latest events and never recommended.
    page, cart = got[0], got[1:3]
    again = [i["item_id"] for i in recommend(client, user, n=10, context={"item_id": page, "cart": cart})["items"]]
    assert not {page, *cart} & set(again) and again != got


def test_new_events_change_the_next_list_and_retries_are_idempotent(client, service):
    user = new_user()
    first = recommend(client, user, n=10)
    assert first["cold"] is True
    clicked = first["items"][0]["item_id"]
    event = {"event_id": f"e-{uuid.uuid4().hex}", "user_id": user, "item_id": clicked, "action": "click",
             "request_id": first["request_id"]}
    assert post_events(client, event).json() == {"accepted": 1, "duplicates": 0}
    assert post_events(client, event).json() == {"accepted": 0, "duplicates": 1}
    second = recommend(client, user, n=10)
    assert second["cold"] is False and clicked not in [i["item_id"] for i in second["items"]]
    assert any(i["source"] in ("dense", "cooccurrence") for i in second["items"])
    hist = client.get(f"/v1/users/{user}/history", headers=KEY).json()
    assert hist["user_id"] == user
    assert [(e["item_id"], e["action"], e["request_id"], e["origin"]) for e in hist["events"]] == [
        (clicked, "click", first["request_id"], "live")]


def test_scrolled_past_and_removed_items_are_demoted_for_the_window_only(client, service):
    user = a_dataset_user(service)
    before = [i["item_id"] for i in recommend(client, user, n=10)["items"]]
    now = time.time()
    window = service.settings.demotion_window_s
    old = [{"user_id": user, "item_id": before[0], "action": "scroll_past", "timestamp": now - 2 * window}]
    assert post_events(client, *old).status_code == 200
    assert [i["item_id"] for i in recommend(client, user, n=10)["items"]] == before  # a stale scroll-past is gone
    recent = [{"user_id": user, "item_id": before[1], "action": "scroll_past"},
              {"user_id": user, "item_id": before[2], "action": "scroll_past"},
              {"user_id": user, "item_id": before[3], "action": "remove_from_cart"}]
    assert post_events(client, *recent).json()["accepted"] == 3
    after = [i["item_id"] for i in recommend(client, user, n=10)["items"]]
    assert len(after) == 10 and not set(before[1:4]) & set(after)


def test_filters_and_diversity(client, service):
    user = a_dataset_user(service)
    body = recommend(client, user, n=10, filters={"categories": ["hair care"], "max_price": 30})
    assert len(body["items"]) == 10
    for rec in body["items"]:
        item = service.item(rec["item_id"])
        assert "hair care" in item["category"].lower() and item["price"] is not None and item["price"] <= 30
    plain = recommend(client, user, n=10, diversity=0.0)["items"]
    spread = recommend(client, user, n=10, diversity=1.0)["items"]

    def categories(items):
        return len({service.item(i["item_id"])["category"] for i in items})

    assert categories(spread) > categories(plain)


# -- bad input ------------------------------------------------------------------------------------------------
BAD_RECOMMEND = [
    ({"n": 5}, 422, "body.user_id: Field required"),
    ({"user_id": 123}, 422, "body.user_id: Input should be a valid string"),
    ({"user_id": "u", "n": "ten"}, 422, "body.n: Input should be a valid integer"),
    ({"user_id": "u", "n": 0}, 422, "body.n: Input should be greater than or equal to 1"),
    ({"user_id": "u", "n": 101}, 422, "n must be at most 100"),
    ({"user_id": "u", "context": {"cart": ["no-such-item"]}}, 422, "context.cart: unknown item 'no-such-item'"),
    ({"user_id": "u", "context": {"item_id": "nope"}}, 422, "context.item_id: unknown item 'nope'"),
    ({"user_id": "u", "diversity": 2}, 422, "body.diversity: Input should be less than or equal to 1"),
    ({"user_id": "u", "colour": "red"}, 422, "body.colour: Extra inputs are not permitted"),
    ({"user_id": "u", "surface": "Home Page!"}, 422, "body.surface: String should match pattern"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_RECOMMEND, ids=[m for _, _, m in BAD_RECOMMEND])
def test_bad_recommend_requests_are_refused_clearly(client, body, status, message):
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_bad_event_batches_are_refused_whole(client, service):
    item = service.popular(1)[0]["item_id"]
    user = new_user()
    good = {"user_id": user, "item_id": item, "action": "view"}
    cases = [
        ([good, {**good, "item_id": "no-such-item"}], 422, "events[1].item_id: unknown item 'no-such-item'"),
        ([good, {**good, "action": "flyy"}], 422, "unknown action 'flyy' (known: view, hover, click"),
        ([good, {**good, "action": 7}], 422, "body.events.1.action: Input should be a valid string"),
        ([good, {**good, "timestamp": "yesterday"}], 422, "body.events.1.timestamp: Input should be a valid number"),
        ([good, {**good, "timestamp": time.time() + 7 * 86400}], 422, "more than a day in the future"),
        ([good, {"user_id": user, "item_id": item}], 422, "body.events.1.action: Field required"),
        ([good, {**good, "acton": "view"}], 422, "body.events.1.acton: Extra inputs are not permitted"),
        ([], 422, "body.events: List should have at least 1 item"),
        ([good] * 101, 413, "101 events in one batch; at most 100"),
    ]
    for events, status, message in cases:
        r = post_events(client, *events)
        assert r.status_code == status and message in r.json()["detail"], (message, r.text)
    r = client.post("/v1/events", content=b'{"events": [{"user_id": ', headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == "the body is not valid JSON"
    infinite = json.dumps({"events": [{**good, "value": float("inf")}]})  # Python writes it as Infinity
    r = client.post("/v1/events", content=infinite, headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 422 and "finite number" in r.json()["detail"]
    big = json.dumps({"events": [good] * 90, "pad": "x" * 70_000})
    r = client.post("/v1/events", content=big, headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 413 and "over 65536 bytes" in r.json()["detail"]
    assert service.history(user) == []  # nothing of any refused batch was stored


def test_write_and_admin_routes_need_a_valid_key(client, service):
    item = service.popular(1)[0]["item_id"]
    batch = {"events": [{"event_id": uuid.uuid4().hex, "user_id": new_user(), "item_id": item, "action": "view"}]}
    routes = [("post", "/v1/events", batch), ("post", "/v1/items", {"item_id": "k1", "title": "t"}),
              ("patch", f"/v1/items/{item}", {"price": 1.0}), ("delete", f"/v1/items/{item}", None),
              ("get", "/v1/models", None), ("post", "/v1/models/v0001/activate", None),
              ("post", "/v1/models/rollback", None), ("post", "/v1/loop/run", None), ("get", "/v1/loop/status", None),
              ("get", "/v1/users/someone/history", None)]
    for method, path, body in routes:
        kw = {} if body is None else {"json": body}
        r = client.request(method, path, **kw)
        assert r.status_code == 401 and "API key is required" in r.json()["detail"], (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        r = client.request(method, path, headers={"X-API-Key": API_KEY[::-1]}, **kw)
        assert r.status_code == 403 and r.json() == {"detail": "the API key is not valid"}, (path, r.text)
    assert service.item(item) is not None  # the refused DELETE deleted nothing
    # Either header form; the older key of a rotation still works.
    assert client.post("/v1/events", json=batch, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert client.post("/v1/events", json=batch, headers={"X-API-Key": OLD_KEY}).json()["duplicates"] == 1
    # Reading the catalog and recommending are open (recommend_requires_key is off here).
    assert client.get(f"/v1/items/{item}").status_code == 200


# -- items ------------------------------------------------------------------------------------------------------
def test_a_new_product_is_searchable_recommendable_and_accepted_at_once(client, service):
    new = {"item_id": "NEW-LAV-1", "title": "Lavender overnight repair cream for very dry skin", "brand": "Fieldhouse",
           "category": "Beauty > Skin Care > Face > Creams & Moisturizers", "price": 24.0,
           "description": "A rich vegan night cream with lavender oil.", "extra": {"size_ml": 50}}
    r = client.post("/v1/items", json=new, headers=KEY)
    assert r.status_code == 201, r.text
    assert r.json() == {**new, "extra": {"size_ml": 50}}
    assert client.post("/v1/items", json=new, headers=KEY).status_code == 409
    assert client.get("/v1/items/NEW-LAV-1").json()["title"] == new["title"]
    found = client.get("/v1/items", params={"q": "lavender overnight"}).json()
    assert [i["item_id"] for i in found["items"]] == ["NEW-LAV-1"] and found["total"] == 1
    # Dense retrieval finds it for a visitor who says what they want.
    body = recommend(client, new_user(), n=10, context={"preferences": "lavender overnight repair cream dry skin"})
    assert "NEW-LAV-1" in [i["item_id"] for i in body["items"]]
    # Events may name it at once, and its history then drives the next list.
    user = new_user()
    assert post_events(client, {"user_id": user, "item_id": "NEW-LAV-1", "action": "purchase"}).json()["accepted"] == 1
    assert recommend(client, user, n=5)["cold"] is False
    # Edit, then delete: gone from search, item reads and lists; late events naming it still count.
    r = client.patch("/v1/items/NEW-LAV-1", json={"price": 19.5, "brand": None}, headers=KEY)
    assert r.status_code == 200 and r.json()["price"] == 19.5 and r.json()["brand"] is None
    assert r.json()["title"] == new["title"] and r.json()["extra"] == {"size_ml": 50}
    assert client.delete("/v1/items/NEW-LAV-1", headers=KEY).status_code == 204
    assert client.get("/v1/items/NEW-LAV-1").status_code == 404
    assert client.get("/v1/items", params={"q": "lavender overnight"}).json()["total"] == 0
    body = recommend(client, new_user(), n=10, context={"preferences": "lavender overnight repair cream dry skin"})
    assert "NEW-LAV-1" not in [i["item_id"] for i in body["items"]]
    assert post_events(client, {"user_id": user, "item_id": "NEW-LAV-1", "action": "review", "value": 5}).status_code == 200
    # The changes are on disk: a service started over the same state has them.
    replayed, deleted = replay_catalog_log(service.settings.catalog_log, service.base_catalog)
    assert "NEW-LAV-1" in replayed and deleted == {replayed.index_of("NEW-LAV-1")}
    assert replayed.item(replayed.index_of("NEW-LAV-1")).price == 19.5


def test_bad_item_requests(client, service):
    existing = service.popular(1)[0]["item_id"]
    cases = [
        ("post", "/v1/items", {"item_id": "x1"}, 422, "body.title: Field required"),
        ("post", "/v1/items", {"item_id": "a/b", "title": "t"}, 422, "body.item_id: String should match pattern"),
        ("post", "/v1/items", {"item_id": "x2", "title": "t", "price": -1}, 422, "greater than or equal to 0"),
        ("post", "/v1/items", {"item_id": existing, "title": "t"}, 409, f"item {existing!r} already exists"),
        ("patch", "/v1/items/no-such-item", {"price": 1}, 404, "unknown item 'no-such-item'"),
        ("patch", f"/v1/items/{existing}", {}, 422, "nothing to change"),
        ("patch", f"/v1/items/{existing}", {"title": None}, 422, "title cannot be removed"),
        ("delete", "/v1/items/no-such-item", None, 404, "unknown item 'no-such-item'"),
    ]
    for method, path, body, status, message in cases:
        r = client.request(method, path, headers=KEY, **({} if body is None else {"json": body}))
        assert r.status_code == status and message in r.json()["detail"], (path, body, r.text)
    assert client.get("/v1/items/no-such-item").status_code == 404
    assert client.get("/v1/items", params={"limit": 0}).status_code == 422
    assert service.item("x1") is None and service.item("x2") is None


def test_processes_sharing_the_state_follow_each_others_catalog_changes(service):
    """Two API processes over one state dir and store (here two services in one process): a product added,
    edited or deleted through one reaches the other within the reload interval."""
    peer = Service(service.settings).start()
    try:
        service.add_item(ItemIn(item_id="SHARED-1", title="Argan oil hair serum", category="Beauty > Hair Care"))
        mine = service.serving
        deadline = time.monotonic() + 10
        while peer.item("SHARED-1") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peer.item("SHARED-1")["title"] == "Argan oil hair serum"
        assert peer.ingest([EventIn(user_id=new_user(), item_id="SHARED-1", action="click")]).accepted == 1
        service.update_item("SHARED-1", ItemPatch(price=15.0))
        service.delete_item("SHARED-1")
        while peer.item("SHARED-1") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peer.item("SHARED-1") is None and "SHARED-1" in peer.catalog
        # What a process changed itself reads back from the log as what it serves: nothing to rebuild.
        replayed, deleted = replay_catalog_log(service.settings.catalog_log, service.base_catalog)
        assert replayed.items.equals(service.catalog.items) and deleted == service.serving.state.deleted
        assert service.serving.version == mine.version and service.item("SHARED-1") is None
    finally:
        peer.close()


# -- models, loop ---------------------------------------------------------------------------------------------
def test_models_and_loop_routes_without_versions_or_loop(client, service):
    models = client.get("/v1/models", headers=KEY).json()
    assert models == {"active": None, "serving": "popularity", "loading": None, "load_error": None, "versions": []}
    r = client.post("/v1/models/v0042/activate", headers=KEY)
    assert r.status_code == 404 and "version 'v0042' does not exist" in r.json()["detail"]
    r = client.post("/v1/models/rollback", headers=KEY)
    assert r.status_code == 409 and "nothing to roll back to" in r.json()["detail"]
    r = client.post("/v1/loop/run", headers=KEY)
    assert r.status_code == 409 and r.json() == {"detail": "no loop configured"}
    assert client.get("/v1/loop/status", headers=KEY).json() == {
        "configured": False, "running": False, "detail": {"message": "no loop configured"}}


class CountingLoop:
    """A loop round that reads the store (what a real round starts with) and reports what it saw."""

    def __init__(self, store):
        self.store, self.rounds = store, 0

    def run(self) -> dict:
        self.rounds += 1
        return {"events_seen": self.store.counts().events}

    def status(self) -> dict:
        return {"rounds": self.rounds}


def test_a_configured_loop_runs_in_the_background(client, service):
    service.loop = CountingLoop(service.store)
    try:
        r = client.post("/v1/loop/run", headers=KEY)
        assert r.status_code == 202 and r.json()["configured"] is True
        deadline = time.monotonic() + 10
        while client.get("/v1/loop/status", headers=KEY).json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status = client.get("/v1/loop/status", headers=KEY).json()
        assert status["running"] is False and status["detail"]["rounds"] == 1
        assert status["detail"]["last_result"]["events_seen"] == service.store.counts().events
    finally:
        service.loop = None


# -- the storefront's routes ---------------------------------------------------------------------------------
def test_shop_routes_take_the_shops_own_pages_only(client, service):
    item = service.popular(1)[0]["item_id"]
    visitor = f"v-{uuid.uuid4().hex}"
    body = {"events": [{"event_id": uuid.uuid4().hex, "item_id": item, "action": "hover"}]}
    cookies = {"dragonrec_visitor": visitor}
    shop = TestClient(client.app, cookies=cookies)
    r = shop.post("/shop/events", json=body, headers={"Origin": SHOP})
    assert r.status_code == 200 and r.json() == {"accepted": 1, "duplicates": 0}
    assert [(e["item_id"], e["action"]) for e in service.history(visitor)] == [(item, "hover")]
    refusals = [({"Origin": "https://evil.example"}, cookies, "not from https://evil.example"),
                ({"Referer": "https://evil.example/page"}, cookies, "not from https://evil.example"),
                ({"Origin": "null"}, cookies, "no Origin or Referer"),
                ({}, cookies, "no Origin or Referer"),
                ({"Origin": SHOP}, {}, "no dragonrec_visitor cookie")]
    for headers, jar, message in refusals:
        r = TestClient(client.app, cookies=jar).post("/shop/events", json=body, headers=headers)
        assert r.status_code == 403 and message in r.json()["detail"], (headers, r.text)
    other = {"events": [{"user_id": "someone-else", "item_id": item, "action": "click"}]}
    r = shop.post("/shop/events", json=other, headers={"Referer": f"{SHOP}/product/{item}"})
    assert r.status_code == 403 and "its own visitor" in r.json()["detail"]
    assert len(service.history(visitor)) == 1 and service.history("someone-else") == []
    r = shop.post("/shop/recommend", json={"n": 4, "surface": "item", "context": {"item_id": item}},
                  headers={"Origin": SHOP})
    assert r.status_code == 200 and len(r.json()["items"]) == 4
    imp = service.store.impression(r.json()["request_id"])
    assert imp.user_id == visitor and imp.pipeline.endswith("@item")
    assert shop.post("/shop/recommend", json={"n": 4}, headers={"Origin": "http://other:1"}).status_code == 403


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def test_ingestion_and_impressions_on_postgresql(data_dir, tmp_path, postgres_url):  # noqa: F811
    app = create_app(settings_for(data_dir, tmp_path / "state", store_url=postgres_url))
    with TestClient(app) as client:
        service = app.state.service
        assert client.get("/health").json()["store"] == "postgresql"
        user = new_user()
        body = recommend(client, user, n=5, surface="home")
        assert service.store.impression(body["request_id"]).item_ids == [i["item_id"] for i in body["items"]]
        events = [{"event_id": f"{user}-{k}", "user_id": user, "item_id": i["item_id"], "action": a,
                   "request_id": body["request_id"]}
                  for k, (i, a) in enumerate(zip(body["items"], ["click", "add_to_cart", "purchase"]))]
        assert post_events(client, *events).json() == {"accepted": 3, "duplicates": 0}
        assert post_events(client, *events, events[0] | {"event_id": f"{user}-x"}).json() == {
            "accepted": 1, "duplicates": 3}
        r = post_events(client, {**events[0], "event_id": "fresh"}, {**events[0], "item_id": "no-such-item"})
        assert r.status_code == 422 and service.store.counts().events == 4  # nothing of the bad batch
        assert [e["action"] for e in service.history(user)] == ["click", "add_to_cart", "purchase", "click"]
        assert recommend(client, user, n=5)["cold"] is False
        # A product added here reaches the PostgreSQL store's catalog at once.
        service.add_item(ItemIn(item_id="PG-NEW", title="Rose water facial mist"))
        assert post_events(client, {"user_id": user, "item_id": "PG-NEW", "action": "view"}).json()["accepted"] == 1


def test_the_storefronts_open_routes_are_rate_limited_per_visitor(data_dir, tmp_path):
    """Over the burst, a visitor gets 429 with Retry-After and nothing stored; another visitor is not affected."""
    settings = settings_for(data_dir, tmp_path / "state", shop_burst=3, shop_rate_per_minute=6)
    with TestClient(create_app(settings)) as c:
        service = c.app.state.service
        item = service.catalog.item_ids[0]

        def post(visitor: str, k: int):
            c.cookies.set("dragonrec_visitor", visitor)
            return c.post("/shop/events", headers={"Origin": SHOP},
                          json={"events": [{"event_id": f"{visitor}-{k}", "item_id": item, "action": "view"}]})

        assert [post("alice", k).status_code for k in range(3)] == [200, 200, 200]
        r = post("alice", 3)
        assert r.status_code == 429 and "too many requests" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        assert len(service.store.events_of_user("alice")) == 3  # the refused one was not stored
        assert post("bob", 0).status_code == 200


def test_rate_limiter_refills_over_time():
    from dragonrec.serve.ratelimit import RateLimited, RateLimiter

    now = [0.0]
    lim = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    lim.check("k")
    lim.check("k")
    with pytest.raises(RateLimited, match="retry in 1.0 s"):
        lim.check("k")
    now[0] = 1.0  # one token a second
    lim.check("k")
    with pytest.raises(ValueError):
        RateLimiter(per_minute=0, burst=1)


def test_the_switch_interval_setting_holds_while_the_app_serves_and_is_restored_after(data_dir, tmp_path):
    before = sys.getswitchinterval()
    with TestClient(create_app(settings_for(data_dir, tmp_path / "state", switch_interval_ms=0.5))) as c:
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert recommend(c, new_user(), n=3)["cold"] is True
    assert sys.getswitchinterval() == before
    with TestClient(create_app(settings_for(data_dir, tmp_path / "state2"))):
        assert sys.getswitchinterval() == before  # unset: Python's own
