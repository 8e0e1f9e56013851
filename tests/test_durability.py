"""No lost feedback: events are acknowledged only once stored, so a server killed with SIGKILL in the middle of
a stream of batches loses none it acknowledged, and a client that resends what was not acknowledged ends with
every event stored exactly once."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pandas as pd
import pytest
from conftest_pg import postgres_admin_url, postgres_url  # noqa: F401 (fixtures)
from serve_helpers import API_KEY, Server, beauty_slice

from dragonrec.store import Store

KEY = {"X-API-Key": API_KEY}


def _send(url: str, items: list[str], acked: set[str], pending: list[list[dict]], stop: threading.Event) -> None:
    """Batches of 50 new events until the server stops answering; acknowledged ids go to `acked`, the batch
    in flight when the server died to `pending`."""
    with httpx.Client(base_url=url, timeout=10) as c:
        k = 0
        while not stop.is_set():
            batch = [{"event_id": uuid.uuid4().hex, "user_id": f"u{k % 37}", "item_id": items[(k + j) % len(items)],
                      "action": "click"} for j in range(50)]
            k += 1
            try:
                r = c.post("/v1/events", json={"events": batch}, headers=KEY)
            except httpx.TransportError:
                pending.append(batch)
                return
            if r.status_code != 200:
                pending.append(batch)
                return
            acked.update(e["event_id"] for e in batch)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'feedback.db'}"
    return request.getfixturevalue("postgres_url")


def test_every_acknowledged_event_survives_sigkill_and_resends_store_once(tmp_path, store_url):
    data = beauty_slice(tmp_path / "data", n_items=200, max_users=300)
    items = pd.read_parquet(data / "items.parquet")["item_id"].astype(str).tolist()
    env = {"DRAGONREC_DATA_DIR": str(data), "DRAGONREC_STATE_DIR": str(tmp_path / "state"),
           "DRAGONREC_STORE_URL": store_url, "DRAGONREC_API_KEY": API_KEY}
    acked: set[str] = set()
    pending: list[list[dict]] = []
    for kill in range(3):
        server = Server(env, tmp_path / f"server{kill}.log").__enter__()
        # what was in flight when the last server died is sent again: stored once whether it landed or not
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for batch in pending:
                r = c.post("/v1/events", json={"events": batch}, headers=KEY)
                assert r.status_code == 200, r.text
                acked.update(e["event_id"] for e in batch)
        pending.clear()
        stop = threading.Event()
        sender = threading.Thread(target=_send, args=(server.url, items, acked, pending, stop))
        before = len(acked)
        sender.start()
        deadline = time.monotonic() + 30
        while len(acked) < before + 1000 and time.monotonic() < deadline:  # at least 20 batches acknowledged
            time.sleep(0.05)
        server.proc.kill()  # SIGKILL: no shutdown, no flush
        server.proc.wait()
        stop.set()
        sender.join(timeout=30)
        server._log.close()
        assert len(acked) >= before + 1000
    with Store.open(store_url) as store:
        stored = store.all_events()
    ids = stored["event_id"].astype(str)
    assert acked <= set(ids), f"{len(acked - set(ids))} acknowledged events lost"
    assert ids.is_unique  # nothing stored twice, resends included
    assert len(acked) >= 3000
