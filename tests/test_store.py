"""The feedback store: one suite, run against SQLite (a temp file) and a real PostgreSQL server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest_pg import postgres_admin_url, postgres_url  # noqa: F401 (fixtures)
from sqlalchemy import create_engine, inspect, text

from dragonrec.data import Catalog, DataError, leave_one_out, load_events, load_feedback_log
from dragonrec.schema import EVENT_COLUMNS, Event, Impression
from dragonrec.store import (
    Store,
    StoreConfig,
    StoreError,
    export_dataset,
    export_events,
    export_impressions,
    import_file,
    migrate,
    write_events,
    write_feedback_log,
)
from dragonrec.store.engine import make_engine
from dragonrec.store.models import metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    """The URL of an empty store on each backend: a SQLite file, a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str):
    with Store.open(store_url) as s:
        yield s


def events_batch(n: int = 20, users: int = 4, offset: int = 0) -> list[dict]:
    acts = ["view", "click", "scroll_past", "add_to_cart", "purchase"]
    return [{"user_id": f"u{i % users}", "item_id": f"i{i % 7}", "action": acts[i % len(acts)],
             "timestamp": 1_000.0 + i, "event_id": f"e{i}"} for i in range(offset, offset + n)]


def test_migrations_to_head_on_an_empty_database(store_url: str):
    engine = make_engine(store_url)
    try:
        assert migrate.current_revision(engine) is None
        Store.open(store_url).close()
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            # The migrated schema is exactly the models' (tables, columns, types, indexes, keys).
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == []
        assert {"events", "impressions", "impression_items", "counters", "alembic_version"} <= tables
        Store.open(store_url).close()  # opening again is a no-op
        migrate.downgrade(engine, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()


def test_a_review_table_made_by_an_older_storefront_is_adopted(store_url: str):
    """Before migration 0002 the storefront created `shop_reviews` itself: upgrading such a store keeps it and
    its rows."""
    from sqlalchemy import Column, Double, Integer, MetaData, String, Table, Text, insert, select

    engine = make_engine(store_url)
    try:
        migrate.upgrade(engine, "0001")
        old = MetaData()
        table = Table("shop_reviews", old, Column("event_id", String(64), primary_key=True),
                      Column("item_id", String, nullable=False, index=True), Column("user_id", String, nullable=False),
                      Column("stars", Integer, nullable=False), Column("text", Text, nullable=False),
                      Column("created_at", Double, nullable=False))
        old.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(table).values(event_id="e1", item_id="i1", user_id="u1", stars=5, text="great",
                                              created_at=1.0))
        Store.open(store_url).close()
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.connect() as conn:
            assert conn.execute(select(table.c.text)).scalars().all() == ["great"]
            assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata) == []
    finally:
        engine.dispose()


def test_concurrent_first_opens_migrate_once(store_url: str):
    errors: list[BaseException] = []

    def open_it():
        try:
            Store.open(store_url).close()
        except BaseException as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store.open(store_url) as s:
        assert s.add_events(events_batch(3)) == (3, 0)


def test_the_same_batch_twice_is_stored_once(store: Store):
    batch = events_batch(20)
    assert store.add_events(batch) == (20, 0)
    assert store.add_events(batch) == (0, 20)  # a retried batch is not counted twice
    assert store.add_events(batch[:5] + events_batch(5, offset=20)) == (5, 5)
    counts = store.counts()
    assert counts.events == 25
    assert counts.users == 4 and counts.items == 7
    assert sum(counts.events_by_action.values()) == 25
    # Within one batch, a repeated id is a duplicate too.
    assert store.add_events(events_batch(2, offset=30) * 2) == (2, 2)


def test_awkward_ids_and_values_survive(store: Store):
    odd = ["NULL", 'quote"d', "{brace,comma}", "back\\slash", "ünï 漢字", "tab\tnew\nline", " spaced "]
    batch = [{"user_id": u, "item_id": u, "action": "view", "timestamp": 1.0 + k, "session_id": u,
              "request_id": u, "value": [None, 0.0, -1.5e300, 1e-300][k % 4]} for k, u in enumerate(odd)]
    assert store.add_events(batch) == (len(odd), 0)
    assert store.add_events(batch) == (0, len(odd))
    df = store.events_since(0.0)
    assert df["user_id"].tolist() == odd and df["request_id"].tolist() == odd
    assert df["value"].tolist()[1:4] == [0.0, -1.5e300, 1e-300] and math.isnan(df["value"].iloc[0])
    imp = Impression(request_id=odd[2], user_id=odd[3], item_ids=odd, sources=odd, timestamp=9.0)
    assert store.add_impression(imp) and store.impression(odd[2]) == imp


def test_events_without_ids_get_deterministic_ids(store: Store):
    batch = [Event(user_id="u1", item_id="a", action="click", timestamp=5.0, request_id="r1"),
             # no request id: another event than the first
             {"user_id": "u1", "item_id": "a", "action": "clicked", "timestamp": 5},
             {"user_id": "u1", "item_id": "b", "action": "view", "timestamp": 6.0, "value": 1200.0}]
    assert store.add_events(batch) == (3, 0)
    # "clicked" == "click", 5 == 5.0: the same event again, re-sent by another client.
    resent = {"user_id": "u1", "item_id": "a", "action": "click", "timestamp": 5.0}
    assert store.add_events([resent]) == (0, 1)
    df = store.events_of_user("u1")
    assert df["item_id"].tolist() == ["a", "a", "b"]
    assert df["value"].iloc[2] == 1200.0 and math.isnan(df["value"].iloc[0])
    assert df["event_id"].nunique() == 3


BAD_FIELDS = [  # (what replaces part of a good event, the field named, words in the error)
    ({"action": "teleport"}, "action", "unknown action 'teleport'"),
    ({"action": None}, "action", "missing"),
    ({"timestamp": float("nan")}, "timestamp", "NaN"),
    ({"timestamp": float("inf")}, "timestamp", "not finite"),
    ({"timestamp": "yesterday"}, "timestamp", "wrong type str"),
    ({"user_id": 3.5}, "user_id", "wrong type float"),
    ({"item_id": None}, "item_id", "missing"),
    ({"value": "lots"}, "value", "wrong type str"),
    ({"user_id": ""}, "user_id", "empty string"),
]


def test_a_half_bad_batch_stores_nothing(store: Store):
    for bad, field, words in BAD_FIELDS:
        batch = events_batch(10)
        batch[6] = {**batch[6], **bad}
        with pytest.raises(StoreError) as info:
            store.add_events(batch)
        err = info.value
        assert (err.index, err.field) == (6, field), bad
        assert "event 6" in str(err) and words in str(err) and "nothing of the batch was stored" in str(err)
        assert store.counts().events == 0


def test_a_missing_field_names_the_event(store: Store):
    batch = events_batch(4)
    del batch[2]["timestamp"]
    with pytest.raises(StoreError, match=r"event 2 \(user_id 'u2', item_id 'i2'\): timestamp: missing field"):
        store.add_events(batch)
    # An impression and events written together: a bad event stores neither.
    with pytest.raises(StoreError):
        store.write(events=batch, impressions=[Impression(request_id="r", user_id="u", item_ids=["a"])])
    assert store.counts().events == 0 and store.counts().impressions == 0


def test_unknown_item_refused_with_a_catalog(store_url: str, tmp_path: Path):
    with Store.open(store_url, items=Catalog.from_ids(["i0", "i1", "i2"])) as store:
        ok = [{"user_id": "u", "item_id": "i1", "action": "view", "timestamp": 1.0}]
        bad = ok + [{"user_id": "u", "item_id": "zz", "action": "view", "timestamp": 2.0}]
        with pytest.raises(StoreError, match=r"event 1 .*item_id: unknown item 'zz'"):
            store.add_events(bad)
        with pytest.raises(StoreError, match=r"impression 0 .*item_ids\[1\]: unknown item 'zz'"):
            store.add_impression(Impression(request_id="r1", user_id="u", item_ids=["i0", "zz"]))
        assert store.counts().events == 0 and store.counts().impressions == 0
        assert store.add_events(ok) == (1, 0)
        # A file naming an unknown item fails with its file and line, and stores nothing.
        path = tmp_path / "events.csv"
        rows = [{"user_id": "u", "item_id": i, "timestamp": t} for t, i in enumerate(["i0", "i2", "zz"])]
        pd.DataFrame(rows).to_csv(path, index=False)
        with pytest.raises(DataError, match=r"events.csv: line 4: unknown item: 'zz'"):
            import_file(store, path)
        assert store.counts().events == 1


def test_events_answering_unknown_requests(store_url: str):
    answer = {"user_id": "u", "item_id": "a", "action": "click", "timestamp": 2.0, "request_id": "r-late"}
    with Store.open(store_url) as store:  # default: allowed, the impression may arrive later
        assert store.add_events([answer]) == (1, 0)
        late = Impression(request_id="r-late", user_id="u", item_ids=["a", "b"], timestamp=1.0)
        assert store.add_impression(late)
        assert [e.item_id for e in store.feedback()[0].events] == ["a"]
    with Store.open(store_url, config=StoreConfig(require_known_request=True)) as strict:
        other = {**answer, "request_id": "r-none", "timestamp": 3.0}
        with pytest.raises(StoreError, match=r"event 1 .*request_id: unknown request_id 'r-none'"):
            strict.add_events([{**answer, "timestamp": 4.0}, other])
        assert strict.counts().events == 1
        # Written together with its impression, it is known.
        imp = Impression(request_id="r-none", user_id="u", item_ids=["a"], timestamp=2.5)
        assert strict.write(events=[other], impressions=[imp]).events_accepted == 1


def test_impressions_keep_slots_and_answers(store: Store):
    imp = Impression(request_id="r1", user_id="u1", item_ids=["a", "b", "c"], model_version="v3",
                     pipeline="rag", timestamp=100.0, scores=[0.9, 0.5, None],
                     sources=["dense", "popularity", "dense"], propensities=[0.7, 0.2, 0.1])
    plain = Impression(request_id="r2", user_id="u1", item_ids=["d"], timestamp=200.0)
    other = Impression(request_id="r3", user_id="u2", item_ids=["a"], timestamp=150.0)
    assert store.add_impressions([imp, plain, other]) == (3, 0)
    assert store.add_impression(imp) is False
    assert store.impression("r1") == imp
    assert store.impression("nope") is None
    assert [i.request_id for i in store.impressions(user_id="u1")] == ["r1", "r2"]
    assert [i.request_id for i in store.impressions(since=120.0)] == ["r3", "r2"]
    assert export_impressions(store) == [imp, other, plain]
    store.add_events([
        {"user_id": "u1", "item_id": "b", "action": "click", "timestamp": 101.0, "request_id": "r1"},
        {"user_id": "u1", "item_id": "b", "action": "purchase", "timestamp": 130.0, "request_id": "r1"},
        {"user_id": "u1", "item_id": "a", "action": "view", "timestamp": 99.0}])
    fb = {f.impression.request_id: f for f in store.feedback(user_id="u1")}
    assert [(e.action.value, e.item_id) for e in fb["r1"].events] == [("click", "b"), ("purchase", "b")]
    assert fb["r2"].events == []
    counts = store.counts()
    assert (counts.impressions, counts.impression_items, counts.answered_impressions) == (3, 5, 1)
    with pytest.raises(StoreError, match=r"impression 0 .*propensities: 2 values for 3"):
        store.add_impression(imp.model_copy(update={"request_id": "r9", "propensities": [0.5, 0.5]}))
    with pytest.raises(StoreError, match=r"propensities\[0\]: 1.5 is not a probability"):
        store.add_impression(plain.model_copy(update={"request_id": "r9", "propensities": [1.5]}))


def test_the_request_paths_lean_read_orders_as_events_of_user(store: Store):
    # same-time events: explicit order first (missing last), then arrival; the limit keeps the latest
    rows = [{"user_id": "u", "item_id": f"i{k}", "action": "view", "timestamp": ts, "event_id": f"x{k}",
             **({"order": o} if o is not None else {})}
            for k, (ts, o) in enumerate([(5.0, None), (5.0, 2.0), (5.0, 1.0), (3.0, None), (7.0, None), (5.0, None)])]
    store.add_events(rows[:4])
    store.add_events(rows[4:])
    store.add_events([{"user_id": "other", "item_id": "i9", "action": "click", "timestamp": 6.0, "event_id": "y"}])
    full = store.events_of_user("u")
    assert full["item_id"].tolist() == ["i3", "i2", "i1", "i0", "i5", "i4"]
    lean = store.recent_events("u", limit=100)
    assert [e[0] for e in lean] == full["item_id"].tolist()
    assert lean[0] == ("i3", "view", 3.0)
    assert [e[0] for e in store.recent_events("u", limit=3)] == store.events_of_user("u", limit=3)["item_id"].tolist()
    assert store.recent_events("nobody", limit=5) == []


def test_reads_for_the_loop(store: Store):
    store.add_events(events_batch(12))
    df = store.events_of_user("u1")
    assert df["timestamp"].is_monotonic_increasing and (df["user_id"] == "u1").all()
    last2 = store.events_of_user("u1", limit=2)
    assert last2["timestamp"].tolist() == df["timestamp"].tolist()[-2:]
    assert store.events_of_user("u1", limit=1, before=1005.0)["timestamp"].tolist() == [1001.0]
    assert store.events_since(1010.0)["timestamp"].tolist() == [1010.0, 1011.0]
    first, cursor = store.new_events(after=0, limit=5)
    assert len(first) == 5
    rest, cursor2 = store.new_events(after=cursor)
    assert len(rest) == 7 and set(first["event_id"]).isdisjoint(rest["event_id"])
    nothing, same = store.new_events(after=cursor2)
    assert len(nothing) == 0 and same == cursor2
    store.add_events(events_batch(2, offset=100))
    new, cursor3 = store.new_events(after=cursor2)
    assert new["event_id"].tolist() == ["e100", "e101"] and cursor3 > cursor2
    imps, icur = store.new_impressions(after=0)
    assert imps == [] and icur == 0
    store.add_impression(Impression(request_id="r", user_id="u", item_ids=["a"]))
    imps, icur = store.new_impressions(after=icur)
    assert [i.request_id for i in imps] == ["r"] and icur > 0


def write_seed_log(path: Path) -> Path:
    lines = [
        {"user_browsing_history": ["prod_1", "prod_2"],
         "llm_recommendations": ["prod_3", "prod_45", "prod_7"], "user_action": "clicked prod_45"},
        {"user_id": "alice", "timestamp": 1_700_000_000, "user_browsing_history": ["prod_3"],
         "llm_recommendations": ["prod_5", "prod_6"], "user_action": "added prod_5 to cart"},
        {"user_id": "alice", "timestamp": 1_700_000_100, "user_browsing_history": ["prod_3", "prod_5"],
         "llm_recommendations": ["prod_8", "prod_9"], "user_action": "ignored"},
        {"user_browsing_history": [], "llm_recommendations": ["prod_1"], "user_action": "purchased prod_1"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def same_events(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = list(EVENT_COLUMNS) + ["item_idx"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True).astype(object),
                                  b[cols].reset_index(drop=True).astype(object))


def by_request(imps: list[Impression]) -> list[Impression]:
    return sorted(imps, key=lambda i: i.request_id)


def test_the_original_log_format_round_trips(store: Store, tmp_path: Path):
    log = write_seed_log(tmp_path / "feedback.jsonl")
    events, imps, catalog = load_feedback_log(log)
    report = import_file(store, log)
    assert (report.impressions_accepted, report.events_accepted) == (4, len(events))
    again = import_file(store, log)  # a re-import stores nothing new
    assert (again.impressions_accepted, again.events_accepted) == (0, 0)
    assert again.events_duplicate == len(events)
    same_events(export_events(store, catalog), events)
    assert by_request(export_impressions(store)) == by_request(imps)
    # And back to the log format: it reads into the same impressions and events.
    out = tmp_path / "exported.jsonl"
    assert write_feedback_log(store, out) == (4, 0)
    events2, imps2, _ = load_feedback_log(out)
    same_events(events2.assign(item_idx=catalog.indices(events2["item_id"])), events)
    assert by_request(imps2) == by_request(imps)


def test_export_feeds_leave_one_out(store: Store, tmp_path: Path):
    rng = np.random.default_rng(0)
    acts = ["purchase", "click", "scroll_past", "view"]
    rows = [{"customer": f"c{u}", "product": f"p{int(rng.integers(30))}", "when": 1_000 + 10 * t + u,
             "what": acts[t % 4]} for u in range(15) for t in range(8)]
    path = tmp_path / "mine.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    mapping = {"user_id": "customer", "item_id": "product", "timestamp": "when", "action": "what"}
    report = import_file(store, path, mapping=mapping)
    assert report.events_accepted == len(rows)
    exported = export_events(store)
    assert list(exported.columns) == [*EVENT_COLUMNS, "item_idx"]
    # The same table as reading the file directly, so everything that takes the readers' output takes it.
    catalog = Catalog.from_ids(pd.unique(exported["item_id"]))
    direct = load_events(path, mapping=mapping)
    same_events(exported, direct.assign(item_idx=catalog.indices(direct["item_id"])))
    split = leave_one_out(exported)
    assert len(split.test) == len(split.valid) == 15
    assert set(split.test.target_actions) <= {"purchase", "click", "view"}  # positives only
    assert len(split.train) == len(rows) - 15 * 2 - 15  # each user's last two positives and what follows
    dataset = export_dataset(store)
    assert len(dataset.catalog) == exported["item_id"].nunique()
    # Files written from the store read back as the same events.
    for suffix in ("parquet", "csv", "jsonl"):
        f = tmp_path / f"out.{suffix}"
        write_events(store, f)
        back = load_events(f)
        assert back["item_id"].tolist() == exported["item_id"].tolist()
        assert back["action"].tolist() == exported["action"].tolist()


def test_concurrent_writers_store_every_event_once(store_url: str):
    Store.open(store_url).close()  # migrated once; the writers then race on the data only
    n_batches, size = 6, 50
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(start: int):
        try:
            with Store.open(store_url) as s:
                for b in range(n_batches):
                    # Writer 0 covers events [0, 300), writer 1 [150, 450): half of each overlaps the other.
                    r = s.add_events(events_batch(size, offset=start + b * size))
                    with lock:
                        results.append(r)
        except BaseException as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(start,)) for start in (0, 150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store.open(store_url) as s:
        df, _ = s.new_events(0)
        assert sorted(df["event_id"]) == sorted(f"e{i}" for i in range(450))
        assert df["ingest_seq"].is_unique
    assert sum(a for a, _ in results) == 450
    assert sum(d for _, d in results) == 150


def overlapping_batch(start: int, b: int, size: int = 20) -> list[dict]:
    return [{"user_id": f"u{i % 5}", "item_id": f"i{i % 9}", "action": "view", "timestamp": float(i),
             "event_id": f"e{i}"} for i in range(start + size * b, start + size * (b + 1))]


# The second writer: the same batches as `overlapping_batch`, started when this process says go.
WRITER = """
import sys, time
from pathlib import Path
from dragonrec.store import Store
url, start, flags = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
with Store.open(url) as s:
    (flags / "ready").touch()
    while not (flags / "go").exists():
        time.sleep(0.005)
    for b in range(30):
        batch = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 9}", "action": "view", "timestamp": float(i),
                  "event_id": f"e{i}"} for i in range(start + 20 * b, start + 20 * (b + 1))]
        print(*s.add_events(batch))
"""


def test_concurrent_writer_processes_on_sqlite(tmp_path: Path):
    """This process and a second one add overlapping batches at the same time: [0, 600) and [300, 900)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    child = subprocess.Popen([sys.executable, "-c", WRITER, url, "300", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Store.open(url) as store:
            deadline = time.monotonic() + 120
            while not (tmp_path / "ready").exists():
                assert child.poll() is None, child.communicate()[1]
                assert time.monotonic() < deadline, "the second writer did not start"
                time.sleep(0.01)
            (tmp_path / "go").touch()
            mine = [store.add_events(overlapping_batch(0, b)) for b in range(30)]
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, err
    theirs = [tuple(map(int, line.split())) for line in out.splitlines() if line.strip()]
    assert len(theirs) == 30
    assert sum(a for a, _ in mine + theirs) == 900 and sum(d for _, d in mine + theirs) == 300
    with Store.open(url) as s:
        df, _ = s.new_events(0)
        assert sorted(df["event_id"]) == sorted(f"e{i}" for i in range(900))


def test_a_dropped_postgresql_connection_fails_one_request_and_the_pool_reconnects(request):
    """Without a ping per checkout (`pool_pre_ping` off, the default): when the server drops the pooled
    connections (a restart, killed backends), the one call that meets a dead connection raises
    OperationalError (the service's 503) and stores nothing; the pool is refilled and the next calls work."""
    from sqlalchemy.exc import OperationalError

    url, admin_url = request.getfixturevalue("postgres_url"), request.getfixturevalue("postgres_admin_url")
    with Store.open(url) as s:
        s.add_events(events_batch(5))
        assert len(s.recent_events("u0", 10)) == 2
        with s.engine.connect() as conn:  # the pooled connection the next call would take
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        admin.dispose()
        with pytest.raises(OperationalError):
            s.add_events(events_batch(5, offset=5))
        s.add_events(events_batch(5, offset=5))  # a fresh connection: the retried batch is stored once
        assert s.counts().events == 10
        assert [e[0] for e in s.recent_events("u0", 10)] == ["i0", "i4", "i1"]


def test_event_groups_share_one_transaction_and_count_as_each_group_alone(store: Store):
    """Group commit (`add_event_groups`): per group (accepted, duplicates) as `add_events` would answer the groups
    one after another; a bad event anywhere stores nothing of any group."""
    e = events_batch(4)
    store.add_events([e[0]])
    assert store.add_event_groups([[e[0], e[1]], [e[1], e[2]], [e[0]], [e[3], e[3]]]) == [(1, 1), (1, 1), (0, 1),
                                                                                          (1, 1)]
    assert store.counts().events == 4
    bad = {**events_batch(1, offset=10)[0], "action": "teleport"}
    with pytest.raises(StoreError, match="action"):
        store.add_event_groups([events_batch(2, offset=20), [bad]])
    assert store.counts().events == 4
    assert store.add_event_groups([]) == [] and store.add_event_groups([[]]) == [(0, 0)]


def _numbered(store: Store) -> dict:
    """What a store holds, as comparable values: every record with its ingestion number."""
    out = {}
    with store.engine.connect() as conn:
        for t in ("impressions", "impression_items", "events"):
            rows = conn.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2")).mappings().all()
            out[t] = [tuple(v for k, v in r.items() if k != "ingested_at") for r in rows]  # wall-clock: differs
        out["seq"] = conn.execute(text("SELECT value FROM counters")).scalar_one()
    return out


def test_a_postgresql_write_is_one_autocommitted_statement_that_stores_what_the_general_path_does(request):
    """PostgreSQL writes go as one statement committed on its own (the ingestion counter's lock is held only
    inside the server, not across the client's round trips); the general path (one transaction, statement by
    statement: SQLite, and PostgreSQL when events must name a stored request) stores the same records, numbered
    the same, and answers the same counts, duplicates included."""
    from sqlalchemy import event as sa_event

    from dragonrec.store.pgtemp import create_database, drop_database

    imp = lambda rid, items: Impression(request_id=rid, user_id="u1", item_ids=items, model_version="v1",
                                        timestamp=1.7e9, scores=[0.5] * len(items), sources=["model"] * len(items),
                                        propensities=[1.0] * len(items))
    writes = [{"impressions": [imp("r1", ["a", "b"]), imp("r2", ["c"])], "events": events_batch(3)},
              {"impressions": [imp("r1", ["z"]), imp("r3", ["a", "b", "c"])], "events": events_batch(4, offset=2)},
              {"events": events_batch(2, offset=10)}, {"impressions": [imp("r4", ["b"])]},
              {"impressions": [imp("r4", ["b"])], "events": events_batch(1, offset=10)}]  # all duplicates
    url = request.getfixturevalue("postgres_url")
    admin = request.getfixturevalue("postgres_admin_url")
    name = f"general_{int(time.time() * 1e6)}"
    general_url = create_database(admin, name)
    request.addfinalizer(lambda: drop_database(admin, name))
    with Store.open(url) as one, Store.open(general_url, config=StoreConfig(require_known_request=True)) as general:
        statements = []
        sa_event.listen(one.engine, "before_cursor_execute",
                        lambda conn, cur, stmt, params, ctx, many: statements.append(conn.in_transaction()))
        for w in writes:
            statements.clear()
            got = one.write(**w)
            if got.events_accepted + got.impressions_accepted + got.events_duplicate + got.impressions_duplicate:
                assert len(statements) == 1
            assert got == general.write(**w)
        a, b = _numbered(one), _numbered(general)
        assert a == b and a["seq"] == 16  # duplicates use up their numbers too, on both paths
        assert [r[-1] for r in a["impressions"]] == [1, 2, 7, 14]  # each write numbers impressions, then events
        stored_items = {(r[0], r[1]): r[2] for r in a["impression_items"]}
        assert stored_items[("r1", 0)] == "a" and ("r1", 1) in stored_items  # the first r1 kept, its slots too
        assert len(a["impression_items"]) == 2 + 1 + 3 + 1


def test_a_postgresql_store_under_a_burst_reuses_its_pool_and_opens_no_more_connections(request):
    """More concurrent callers than pooled connections: they wait for a pooled one (no overflow by default),
    so the server sees `pool_size` backends in all, not a backend forked and closed for each extra caller (the
    overflow's churn under load); every call still answers. With an overflow the same burst opens more."""
    from sqlalchemy import event

    url = request.getfixturevalue("postgres_url")
    with Store.open(url) as s:
        s.add_events(events_batch(40))

    def burst(config: StoreConfig) -> tuple[int, list[int]]:
        opened = []
        with Store.open(url, config=config) as s:
            event.listen(s.engine, "connect", lambda *_: opened.append(1))
            answers: list[int] = []
            barrier = threading.Barrier(16)

            def caller() -> None:
                barrier.wait()
                for _ in range(15):
                    answers.append(len(s.recent_events("u1", 100)))

            threads = [threading.Thread(target=caller) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return len(opened), answers

    opened, answers = burst(StoreConfig(pool_size=3, migrate=False))
    assert len(answers) == 16 * 15 and set(answers) == {10}
    assert opened <= 3
    opened, _ = burst(StoreConfig(pool_size=3, max_overflow=10, migrate=False))
    assert opened > 3  # the overflow: what the default no longer does
