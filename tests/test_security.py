"""Security beyond the keyed routes of tests/test_serve_api.py: secrets (API keys, the store's password) never
reach logs, error bodies or the settings' repr; the dashboard is admin-only, also against forged and revoked
cookies; CORS answers only the shop's origin and never lets a page send an API key; the service's cookies are
HttpOnly, SameSite and Secure when the shop is on https."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from http.cookies import SimpleCookie

import pytest
from fastapi.testclient import TestClient
from serve_helpers import API_KEY, OLD_KEY, beauty_slice, free_port
from sqlalchemy import create_engine

from dragonrec.serve import Settings, create_app
from dragonrec.serve.dashboard import ADMIN_COOKIE, _token
from dragonrec.store import Store

PASSWORD = "Pg-Pa55word-do-not-log"
SHOP_ORIGIN = "https://shop.example"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return beauty_slice(tmp_path_factory.mktemp("security") / "data", n_items=120, max_users=150)


@pytest.fixture(scope="module")
def client(data_dir, tmp_path_factory):
    settings = Settings(data_dir=data_dir, state_dir=tmp_path_factory.mktemp("state"), api_keys=[API_KEY, OLD_KEY],
                        storefront_origins=[SHOP_ORIGIN])
    with TestClient(create_app(settings)) as c:
        yield c


def cookie_attrs(set_cookie: str) -> dict[str, str | bool]:
    morsel = next(iter(SimpleCookie(set_cookie).values()))
    return {k: v for k, v in morsel.items() if v}


# -- secrets -------------------------------------------------------------------------------------------------
def test_api_keys_never_reach_logs_or_response_bodies(client, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    service = client.app.state.service
    bodies = []
    for key in (API_KEY, OLD_KEY):
        headers = {"X-API-Key": key}
        bodies += [client.post("/v1/events", json={"events": [{"user_id": "u"}]}, headers=headers),  # 422
                   client.post("/v1/events", content=b"{not json", headers={**headers, "content-type": "application/json"}),
                   client.get("/v1/models", headers=headers), client.get("/v1/loop/status", headers=headers),
                   client.get("/admin/api/stats", headers=headers)]
    # a key that is almost right is not echoed either (it is somebody's secret with a typo)
    bodies.append(client.get("/v1/models", headers={"X-API-Key": API_KEY[:-1] + "X"}))
    bodies += [client.get("/health"), client.get("/metrics"), client.get("/openapi.json")]
    # an unexpected failure inside a keyed route: a 500 that says nothing, a log with the traceback only
    def explode():
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(service, "models", explode)
    as_a_server = TestClient(client.app, raise_server_exceptions=False)  # answer 500 as uvicorn would
    failed = as_a_server.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert failed.status_code == 500 and failed.json() == {"detail": "internal error; the server log has the details"}
    bodies.append(failed)
    # the admin login: a wrong key is not shown back; a right one sets a cookie that is not the key
    wrong = client.post("/admin/login", content=f"key={OLD_KEY[:-1]}Z", headers={
        "Origin": "http://testserver", "content-type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 401
    right = client.post("/admin/login", content=f"key={API_KEY}", follow_redirects=False, headers={
        "Origin": "http://testserver", "content-type": "application/x-www-form-urlencoded"})
    assert right.status_code == 303
    bodies += [wrong, right]
    assert "registry exploded" in caplog.text  # the log did capture what happened
    for secret in (API_KEY, OLD_KEY, API_KEY[:-1], OLD_KEY[:-1]):
        assert secret not in caplog.text
        for r in bodies:
            assert secret not in r.text and secret not in str(r.headers), (r.request.url, r.status_code)
    assert repr(service.settings).count("**********") == 2


def test_the_store_password_never_reaches_logs_errors_or_the_settings_repr(data_dir, tmp_path, caplog):
    url = f"postgresql+psycopg://shop:{PASSWORD}@127.0.0.1:{free_port()}/shop"  # nothing listens there
    settings = Settings(data_dir=data_dir, state_dir=tmp_path / "state", store_url=url, api_keys=[API_KEY])
    assert PASSWORD not in repr(settings) and "shop:***@127.0.0.1" in repr(settings)
    assert settings.resolved_store_url == url  # the service itself still gets the real URL
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as err:  # whatever the driver raises: its text is checked
        Store.open(url)
    assert PASSWORD not in str(err.value) and "Connection refused" in str(err.value)
    with pytest.raises(ValueError, match=r"unsupported store URL 'mysql://shop:\*\*\*@db/shop'") as err:
        Store.open(f"mysql://shop:{PASSWORD}@db/shop")
    assert PASSWORD not in caplog.text
    # a real server that cannot reach its store exits and says why, in a log without the password
    env = {"DRAGONREC_DATA_DIR": str(data_dir), "DRAGONREC_STATE_DIR": str(tmp_path / "state"),
           "DRAGONREC_STORE_URL": url, "DRAGONREC_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "dragonrec.serve.app:app_from_env", "--factory",
                           "--host", "127.0.0.1", "--port", str(free_port()), "--log-level", "debug"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Connection refused" in log, log[-3000:]
    assert PASSWORD not in log and API_KEY not in log


def test_a_store_that_goes_down_answers_503_and_loses_nothing(client, caplog, monkeypatch):
    """The store unreachable (here: its engine pointed at a port nothing listens on): writes and lists answer
    503 with Retry-After and a body without the URL; once it is back, the retried batch is stored once."""
    service = client.app.state.service
    caplog.set_level(logging.DEBUG)
    item = service.popular(1)[0]["item_id"]
    batch = {"events": [{"event_id": "down-1", "user_id": "down-user", "item_id": item, "action": "click"}]}
    dead = create_engine(f"postgresql+psycopg://shop:{PASSWORD}@127.0.0.1:{free_port()}/shop")
    monkeypatch.setattr(service.store, "engine", dead)
    for r in (client.post("/v1/events", json=batch, headers={"X-API-Key": API_KEY}),
              client.post("/v1/recommend", json={"user_id": "down-user"})):
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert "unavailable" in r.json()["detail"] and PASSWORD not in r.text and "127.0.0.1" not in r.text
    assert client.get("/health").status_code == 200  # the process itself is fine: the balancer keeps it
    monkeypatch.undo()
    dead.dispose()
    assert "feedback store unavailable on POST /v1/events" in caplog.text and PASSWORD not in caplog.text
    assert client.post("/v1/events", json=batch, headers={"X-API-Key": API_KEY}).json() == {
        "accepted": 1, "duplicates": 0}
    assert [e["action"] for e in service.history("down-user")] == ["click"]


# -- the dashboard ---------------------------------------------------------------------------------------------
def test_the_dashboard_is_admin_only(client, data_dir, tmp_path):
    visitor = TestClient(client.app)
    assert visitor.get("/").status_code == 200  # a shop visitor, with its cookie
    refusals = [
        ({}, {}),
        ({"X-API-Key": "not-a-key-of-this-service"}, {}),
        ({}, {ADMIN_COOKIE: "forged"}),
        ({}, {ADMIN_COOKIE: API_KEY}),  # the key itself is not the session token
        ({}, {ADMIN_COOKIE: _token("another-service-key-0123456789")}),
    ]
    for headers, cookies in refusals:
        c = TestClient(client.app, cookies={**dict(visitor.cookies), **cookies})
        page = c.get("/admin", headers=headers)
        assert page.status_code == 401 and "Recent events" not in page.text, (headers, cookies)
        stats = c.get("/admin/api/stats", headers=headers)
        assert stats.status_code in (401, 403) and "detail" in stats.json()
    assert client.get("/admin/api/stats", headers={"X-API-Key": API_KEY}).status_code == 200
    admin = TestClient(client.app, cookies={ADMIN_COOKIE: _token(OLD_KEY)})
    assert admin.get("/admin/api/stats").status_code == 200
    # rotating OLD_KEY out revokes the sessions it opened
    settings = Settings(data_dir=data_dir, state_dir=tmp_path / "state", api_keys=[API_KEY])
    with TestClient(create_app(settings), cookies={ADMIN_COOKIE: _token(OLD_KEY)}) as rotated:
        assert rotated.get("/admin/api/stats").status_code == 401
        rotated.cookies.set(ADMIN_COOKIE, _token(API_KEY))
        assert rotated.get("/admin/api/stats").status_code == 200


# -- CORS ------------------------------------------------------------------------------------------------------
def preflight(c: TestClient, path: str, origin: str, headers: str = "content-type"):
    return c.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": headers})


def test_cors_answers_only_the_shops_origin(client, data_dir, tmp_path):
    ok = preflight(client, "/shop/events", SHOP_ORIGIN)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == SHOP_ORIGIN
    assert ok.headers["access-control-allow-credentials"] == "true"
    for origin in ("https://evil.example", "http://shop.example", "https://shop.example.evil.com", "null"):
        r = preflight(client, "/shop/events", origin)
        assert "access-control-allow-origin" not in r.headers, origin
        r = client.post("/shop/events", json={"events": [{"item_id": "x", "action": "view"}]}, headers={"Origin": origin})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # even the shop's own pages may not send an API key cross-origin: keys stay on servers
    r = preflight(client, "/v1/events", SHOP_ORIGIN, headers="content-type,x-api-key")
    assert r.status_code == 400 and "x-api-key" not in r.headers.get("access-control-allow-headers", "").lower()
    r = preflight(client, "/v1/events", SHOP_ORIGIN, headers="authorization")
    assert r.status_code == 400
    # a server with no other shop origin configured answers no cross-origin request at all
    settings = Settings(data_dir=data_dir, state_dir=tmp_path / "state", api_keys=[API_KEY])
    with TestClient(create_app(settings)) as own:
        for origin in (SHOP_ORIGIN, "https://evil.example"):
            assert "access-control-allow-origin" not in preflight(own, "/shop/events", origin).headers
            assert "access-control-allow-origin" not in own.get("/v1/items", headers={"Origin": origin}).headers


# -- cookies ---------------------------------------------------------------------------------------------------
def test_cookies_are_httponly_samesite_and_secure_on_https(client, data_dir, tmp_path):
    # the client's shop origin is https: its cookies are Secure even on a plain-http hop behind the balancer
    visitor = cookie_attrs(TestClient(client.app).get("/").headers["set-cookie"])
    assert visitor["httponly"] is True and visitor["samesite"].lower() == "lax" and visitor["secure"] is True
    assert visitor["path"] == "/"
    form = {"Origin": "http://testserver", "content-type": "application/x-www-form-urlencoded"}
    prefs = TestClient(client.app).post("/preferences", content="do=skip", headers=form, follow_redirects=False)
    assert cookie_attrs(prefs.headers["set-cookie"])["httponly"] is True
    admin = client.post("/admin/login", content=f"key={API_KEY}", headers=form, follow_redirects=False)
    attrs = cookie_attrs(admin.headers["set-cookie"])
    assert attrs["httponly"] is True and attrs["samesite"].lower() == "strict" and attrs["path"] == "/admin"
    assert attrs["secure"] is True
    # a plain-http shop (no https origin) over http: not Secure (a browser would drop it); over https: Secure
    settings = Settings(data_dir=data_dir, state_dir=tmp_path / "state", api_keys=[API_KEY])
    with TestClient(create_app(settings)) as plain:
        attrs = cookie_attrs(plain.get("/").headers["set-cookie"])
        assert "secure" not in attrs and attrs["httponly"] is True and attrs["samesite"].lower() == "lax"
        tls = TestClient(plain.app, base_url="https://testserver")
        assert cookie_attrs(tls.get("/").headers["set-cookie"])["secure"] is True
