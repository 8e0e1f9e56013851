"""Property-based fuzzing of the API (hypothesis): whatever JSON arrives, no route answers 5xx, every refusal
says why, and a refused event batch stores nothing."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import API_KEY, beauty_slice

from dragonrec.serve import Settings, create_app

KEY = {"X-API-Key": API_KEY}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    data = beauty_slice(root / "data", n_items=150, max_users=200)
    with TestClient(create_app(Settings(data_dir=data, state_dir=root / "state", api_keys=[API_KEY]))) as c:
        yield c


def _refused_clearly(r) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert isinstance(r.json().get("detail"), str) and r.json()["detail"]


@FUZZ
@given(body=json_values)
def test_recommend_never_fails_on_any_json(client, body):
    _refused_clearly(client.post("/v1/recommend", json=body))


@FUZZ
@given(user=st.text(max_size=60), n=st.integers(-5, 500), item=st.text(max_size=30),
       cart=st.lists(st.text(max_size=12), max_size=4), diversity=st.floats(-2, 3, allow_nan=False))
def test_recommend_fields_of_any_value(client, user, n, item, cart, diversity):
    _refused_clearly(client.post("/v1/recommend", json={"user_id": user, "n": n, "diversity": diversity,
                                                        "context": {"item_id": item, "cart": cart}}))


@FUZZ
@given(events=st.lists(st.dictionaries(st.sampled_from(["event_id", "user_id", "item_id", "action", "request_id",
                                                         "timestamp", "value", "extra"]), json_values, max_size=8),
                       max_size=6))
def test_a_refused_event_batch_stores_nothing(client, events):
    service = client.app.state.service
    before = service.store.counts().events
    r = client.post("/v1/events", json={"events": events}, headers=KEY)
    _refused_clearly(r)
    after = service.store.counts().events
    if r.status_code != 200:
        assert after == before
    else:
        assert after == before + r.json()["accepted"]


@FUZZ
@given(path=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_item_and_history_paths_of_any_text(client, path):
    quoted = quote(path, safe="")  # any text, as a client would send it
    for url in (f"/v1/items/{quoted}", f"/v1/users/{quoted}/history"):
        _refused_clearly(client.get(url, headers=KEY))
