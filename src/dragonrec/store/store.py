"""The feedback store: what was shown (impressions) and what users did (events), durable and idempotent.

    store = Store.open("sqlite:///runs/feedback.db")          # or postgresql+psycopg://user@host/db
    store.add_impression(Impression(request_id="r1", user_id="u1", item_ids=["a", "b"]))
    store.add_events([Event(user_id="u1", item_id="a", action="click", timestamp=1.7e9, request_id="r1")])
    new, cursor = store.new_events(after=0)                   # the loop's "what happened since last time"
"""

from __future__ import annotations

import functools
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    bindparam,
    cast,
    func,
    literal,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY

from dragonrec.data.catalog import Catalog
from dragonrec.schema import EVENT_COLUMNS, Event, Impression
from dragonrec.store import migrate
from dragonrec.store.config import StoreConfig
from dragonrec.store.engine import make_engine, normalize_url
from dragonrec.store.models import INGEST_COUNTER
from dragonrec.store.models import counters as counters_t
from dragonrec.store.models import events as events_t
from dragonrec.store.models import impression_items as slots_t
from dragonrec.store.models import impressions as impressions_t
from dragonrec.store.validate import StoreError, event_rows, impression_rows

_TAKE_SEQ = (update(counters_t).where(counters_t.c.name == INGEST_COUNTER)
             .values(value=counters_t.c.value + bindparam("n")).returning(counters_t.c.value))

_RECENT_EVENTS = (select(events_t.c.item_id, events_t.c.action, events_t.c.timestamp, events_t.c.event_order,
                         events_t.c.ingest_seq).where(events_t.c.user_id == bindparam("user_id"))
                  .order_by(events_t.c.timestamp.desc(), events_t.c.ingest_seq.desc()).limit(bindparam("limit")))


@functools.cache
def _insert_stmt(backend: str, table: Table, cols: tuple[str, ...], key: str | None):
    """The insert `Store._insert_new` sends: on PostgreSQL one row per element of the array parameters
    `a_<column>`; on SQLite a plain insert run with a list of rows. ON CONFLICT (key) DO NOTHING RETURNING key
    when `key` is given."""
    if backend == "postgresql":
        source = _unnest(table, cols, "a_")
        stmt = postgresql.insert(table).from_select(list(cols), select(*[source.c[c] for c in cols]))
    else:
        stmt = sqlite.insert(table)
    if key is None:
        return stmt
    return stmt.on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])


def _columns(table: Table, rows: list[dict], skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The table's columns the rows carry (the first row's keys), in table order, less `skip`; () for no rows."""
    return tuple(c.name for c in table.columns if rows and c.name in rows[0] and c.name not in skip)


def _unnest(table: Table, cols: tuple[str, ...], prefix: str):
    """The rows of array parameters `<prefix><column>` (one array per column, typed as the table's column) as a
    derived table, numbered from 1 (`ord`)."""
    arrays = [cast(bindparam(f"{prefix}{c}", type_=ARRAY(table.c[c].type)), ARRAY(table.c[c].type)) for c in cols]
    return func.unnest(*arrays).table_valued(*cols, with_ordinality="ord").render_derived()


@functools.cache
def _pg_write_stmt(imp_cols: tuple[str, ...], slot_cols: tuple[str, ...], ev_cols: tuple[str, ...]):
    """A whole write as ONE PostgreSQL statement (data-modifying CTEs): take `n` ingestion numbers from the
    counter, insert the impressions (`i_<column>` arrays) and, of those newly inserted, their slots (`s_<column>`),
    then the events (`e_<column>`), numbered in that order as `Store._write` numbers them. It answers one row
    per inserted record: ("i", request_id) or ("e", event_id).

    Sent alone (autocommit), the counter row's lock is held only inside the server, from the update to the
    commit: never while the client waits for its next round trip (a busy interpreter's GIL), which serialised
    concurrent writers behind the slowest of them (docs/load.md)."""
    seq = (update(counters_t).where(counters_t.c.name == INGEST_COUNTER)
           .values(value=counters_t.c.value + bindparam("n"))
           .returning((counters_t.c.value - bindparam("n")).label("base")).cte("seq"))
    stamp = bindparam("now", type_=impressions_t.c.ingested_at.type)
    parts, ctes = [], []
    if imp_cols:
        src = _unnest(impressions_t, imp_cols, "i_")
        rows = select(*[src.c[c] for c in imp_cols], stamp, seq.c.base + src.c.ord).select_from(src).join(seq, true())
        new_imp = (postgresql.insert(impressions_t).from_select([*imp_cols, "ingested_at", "ingest_seq"], rows)
                   .on_conflict_do_nothing(index_elements=["request_id"]).returning(impressions_t.c.request_id)
                   .cte("new_imp"))
        parts.append(select(literal("i").label("kind"), new_imp.c.request_id.label("key")))
        if slot_cols:
            slots = _unnest(slots_t, slot_cols, "s_")
            ctes.append(postgresql.insert(slots_t).from_select(
                list(slot_cols), select(*[slots.c[c] for c in slot_cols])
                .where(slots.c.request_id.in_(select(new_imp.c.request_id)))).cte("new_slots"))
    if ev_cols:
        src = _unnest(events_t, ev_cols, "e_")
        first = seq.c.base + bindparam("n_imp") + src.c.ord
        rows = select(*[src.c[c] for c in ev_cols], stamp, first).select_from(src).join(seq, true())
        new_ev = (postgresql.insert(events_t).from_select([*ev_cols, "ingested_at", "ingest_seq"], rows)
                  .on_conflict_do_nothing(index_elements=["event_id"]).returning(events_t.c.event_id).cte("new_ev"))
        parts.append(select(literal("e").label("kind"), new_ev.c.event_id.label("key")))
    stmt = parts[0] if len(parts) == 1 else union_all(*parts)
    return stmt.add_cte(*ctes) if ctes else stmt

# Columns of the event tables the reads return: the canonical ones, then the store's own.
EVENT_READ_COLUMNS = (*EVENT_COLUMNS, "event_id", "ingested_at", "ingest_seq")
_IN_CHUNK = 5000  # ids per IN (...) list: well under SQLite's and PostgreSQL's bound-parameter limits


@dataclass(frozen=True)
class WriteResult:
    """What a write did: records newly stored, and records the store already had (or that repeated an
    earlier record of the same batch), by kind."""

    events_accepted: int = 0
    events_duplicate: int = 0
    impressions_accepted: int = 0
    impressions_duplicate: int = 0


@dataclass(frozen=True)
class Feedback:
    """An impression and the events that answer it (by request_id), in time order."""

    impression: Impression
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class StoreCounts:
    """Sizes of the store."""

    events: int
    impressions: int
    impression_items: int
    users: int  # distinct users with events
    items: int  # distinct items with events
    answered_impressions: int  # impressions at least one stored event answers
    events_by_action: dict[str, int]


class Store:
    """Impressions and events in SQLite or PostgreSQL (one schema, chosen by URL), written in validated,
    all-or-nothing, idempotent batches. Use `Store.open(url)`; close it (or use it as a context manager)."""

    def __init__(self, engine: Engine, config: StoreConfig | None = None,
                 known_items: Collection[str] | None = None):
        self.engine = engine
        self.config = config or StoreConfig()
        self.known_items: frozenset[str] | None = (None if known_items is None
                                                   else frozenset(map(str, known_items)))
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported backend {engine.dialect.name!r}")

    @classmethod
    def open(cls, url: str | Path, items: Catalog | Iterable[str] | None = None,
             config: StoreConfig | None = None) -> Store:
        """Open (and create, and migrate to the latest schema) the store at `url`.

        `url`: `sqlite:///path.db` (or a bare path), or `postgresql+psycopg://user@host:port/db`.
        `items`: the catalog (a `Catalog` or its item ids); when given, events and impressions naming other
        items are refused.
        """
        config = config or StoreConfig()
        engine = make_engine(normalize_url(url), config)
        try:
            if config.migrate:
                migrate.upgrade(engine)
        except Exception:
            engine.dispose()
            raise
        if isinstance(items, Catalog):
            items = items.item_ids
        return cls(engine, config, None if items is None else list(items))

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writes -------------------------------------------------------------------------------------

    def add_events(self, events: Iterable[Event | Mapping[str, Any]] | pd.DataFrame) -> tuple[int, int]:
        """Store a batch of events in one transaction; returns (accepted, duplicates).

        Idempotent by event id: an event whose id is already stored (a retried batch, a re-imported file)
        is counted as a duplicate and not stored again. Events without an `event_id` get a deterministic
        one from (user_id, item_id, action, timestamp, request_id), so re-importing the same file stores
        nothing new; two events equal in those five fields are one event unless the caller gives ids.

        Every event is checked first (required fields, types, a known action, a finite timestamp, a known
        item when the store has a catalog); the first bad one raises `StoreError` naming its index in the
        batch and its field, and nothing of the batch is stored. An event may answer a request_id that no
        stored impression has (its impression may still be on its way), unless
        `config.require_known_request` is set.
        """
        result = self.write(events=events)
        return result.events_accepted, result.events_duplicate

    def add_event_groups(self, groups: list[list[Event | Mapping[str, Any]]]) -> list[tuple[int, int]]:
        """Several callers' event batches in one transaction (group commit: one counter lock and one commit
        for all of them): (accepted, duplicates) per group, as `add_events` would answer each alone in this
        order (an event_id repeated in a later group counts as that group's duplicate). All or nothing: a bad
        event raises StoreError (its index counts across the groups) and nothing of any group is stored."""
        checked = event_rows([e for g in groups for e in g], self.known_items)
        inserted = set(self._write(checked, [])[1])
        out, k = [], 0
        for g in groups:
            accepted = 0
            for r in checked[k:k + len(g)]:
                if r["event_id"] in inserted:
                    inserted.discard(r["event_id"])  # the first occurrence is the stored one
                    accepted += 1
            out.append((accepted, len(g) - accepted))
            k += len(g)
        return out

    def add_impression(self, impression: Impression | Mapping[str, Any]) -> bool:
        """Store one impression with its shown items; False if its request_id was already stored (the
        stored one is kept: the first write of a request id wins)."""
        return self.write(impressions=[impression]).impressions_accepted == 1

    def add_impressions(self, impressions: Iterable[Impression | Mapping[str, Any]]) -> tuple[int, int]:
        """Store impressions in one transaction, idempotent by request_id; returns (accepted, duplicates)."""
        result = self.write(impressions=impressions)
        return result.impressions_accepted, result.impressions_duplicate

    def write(self, events: Iterable[Event | Mapping[str, Any]] | pd.DataFrame = (),
              impressions: Iterable[Impression | Mapping[str, Any]] = ()) -> WriteResult:
        """Store impressions and events together in one transaction (all of it or, on any error, none)."""
        return self._write(event_rows(events, self.known_items), impression_rows(impressions, self.known_items))[0]

    def _write(self, checked: list[dict], imp_rows: list) -> tuple[WriteResult, list]:
        """`write` of checked rows; also the event ids it inserted (`add_event_groups` counts them by group)."""
        ev_rows, ev_repeats = _first_of_each(checked, lambda r: r["event_id"])
        imp_rows, imp_repeats = _first_of_each(imp_rows, lambda r: r[0]["request_id"])
        if not ev_rows and not imp_rows:
            return WriteResult(events_duplicate=ev_repeats, impressions_duplicate=imp_repeats), []
        if self.backend == "postgresql" and not self.config.require_known_request:
            imp_new, ev_new = self._write_one_statement(ev_rows, imp_rows)
            return WriteResult(len(ev_new), len(ev_rows) - len(ev_new) + ev_repeats,
                               imp_new, len(imp_rows) - imp_new + imp_repeats), ev_new
        with self.engine.begin() as conn:
            seq = self._take_seq(conn, len(ev_rows) + len(imp_rows))
            now = time.time()
            if self.config.require_known_request:
                self._check_requests(conn, checked, {r[0]["request_id"] for r in imp_rows})
            imp_new = 0
            if imp_rows:
                rows = [{**r, "ingested_at": now, "ingest_seq": next(seq)} for r, _ in imp_rows]
                inserted = set(self._insert_new(conn, impressions_t, rows, "request_id"))
                imp_new = len(inserted)
                slots = [s for r, items in imp_rows if r["request_id"] in inserted for s in items]
                if slots:
                    self._insert_new(conn, slots_t, slots, None)
            ev_new = []
            if ev_rows:
                rows = [{**r, "ingested_at": now, "ingest_seq": next(seq)} for r in ev_rows]
                ev_new = self._insert_new(conn, events_t, rows, "event_id")
        return WriteResult(len(ev_new), len(ev_rows) - len(ev_new) + ev_repeats,
                           imp_new, len(imp_rows) - imp_new + imp_repeats), ev_new

    def _write_one_statement(self, ev_rows: list[dict], imp_rows: list) -> tuple[int, list]:
        """PostgreSQL: the write as one statement in its own transaction (`_pg_write_stmt`): (impressions
        inserted, event ids inserted). Records and numbering as the general path's."""
        slots = [s for _, items in imp_rows for s in items]
        imps = [r for r, _ in imp_rows]
        cols = {name: _columns(table, rows, skip=("ingested_at", "ingest_seq"))
                for name, table, rows in (("i", impressions_t, imps), ("s", slots_t, slots), ("e", events_t, ev_rows))}
        params: dict[str, Any] = {"n": len(imps) + len(ev_rows), "n_imp": len(imps), "now": time.time()}
        for name, rows in (("i", imps), ("s", slots), ("e", ev_rows)):
            params.update({f"{name}_{c}": [r[c] for r in rows] for c in cols[name]})
        stmt = _pg_write_stmt(cols["i"], cols["s"], cols["e"])
        with self.engine.connect() as conn:  # autocommit: one round trip, committed when the statement ends
            inserted = conn.execution_options(isolation_level="AUTOCOMMIT").execute(stmt, params).all()
        return sum(kind == "i" for kind, _ in inserted), [key for kind, key in inserted if kind == "e"]

    def _insert_new(self, conn: Connection, table: Table, rows: list[dict], key: str | None) -> list:
        """INSERT ... ON CONFLICT (key) DO NOTHING; returns the keys of the rows it inserted.

        PostgreSQL gets one statement whose columns are arrays (`INSERT ... SELECT FROM unnest(...)`): a
        multi-row VALUES list of 1,000 events is a 100 kB statement that psycopg re-parses on every call
        (over half the time of a batched write). SQLite takes SQLAlchemy's multi-row VALUES batches.
        The statement is built once per table, columns and key (`_insert_stmt`): building it costs more CPU
        than sending it.
        """
        cols = _columns(table, rows)
        stmt = _insert_stmt(self.backend, table, cols, key)
        if self.backend == "postgresql":
            params = {f"a_{c}": [r[c] for r in rows] for c in cols}
            if key is None:
                conn.execute(stmt, params)
                return []
            return conn.execute(stmt, params).scalars().all()
        if key is None:
            conn.execute(stmt, rows)
            return []
        return conn.execute(stmt, rows).scalars().all()

    def _take_seq(self, conn: Connection, n: int) -> Iterator[int]:
        """Reserve n ingestion sequence numbers. The counter row stays locked until this transaction ends,
        so writers commit in sequence order and `new_events(after=cursor)` never skips a late commit."""
        end = conn.execute(_TAKE_SEQ, {"n": n}).scalar_one()
        return iter(range(end - n + 1, end + 1))

    def _check_requests(self, conn: Connection, ev_rows: list[dict], also_known: set[str]) -> None:
        wanted = {r["request_id"] for r in ev_rows if r["request_id"] is not None} - also_known
        known = set(also_known)
        for chunk in _chunks(sorted(wanted)):
            known.update(conn.execute(select(impressions_t.c.request_id)
                                      .where(impressions_t.c.request_id.in_(chunk))).scalars())
        for index, r in enumerate(ev_rows):
            if r["request_id"] is not None and r["request_id"] not in known:
                raise StoreError("event", index, "request_id",
                                 f"unknown request_id {r['request_id']!r}: no stored impression has it",
                                 f"user_id {r['user_id']!r}, item_id {r['item_id']!r}")

    # --- reads --------------------------------------------------------------------------------------

    def events_of_user(self, user_id: str, limit: int | None = None,
                       before: float | None = None) -> pd.DataFrame:
        """A user's events in time order; with `limit`, the latest `limit` (before `before`, if given)."""
        q = select(*_event_columns()).where(events_t.c.user_id == user_id)
        if before is not None:
            q = q.where(events_t.c.timestamp < before)
        q = q.order_by(events_t.c.timestamp.desc(), events_t.c.ingest_seq.desc())
        if limit is not None:
            q = q.limit(limit)
        return _time_ordered(self._events_frame(q).iloc[::-1])

    def recent_events(self, user_id: str, limit: int) -> list[tuple[str, str, float]]:
        """The latest `limit` events of a user as (item_id, action, timestamp), in the order of
        `events_of_user` (time, explicit order with missing last, then arrival): the request path's lean read,
        plain tuples and no DataFrame. PostgreSQL: one statement in autocommit (a single SELECT reads one snapshot
        anyway), so one round trip instead of three: BEGIN, the SELECT and the ROLLBACK of the pool's reset
        (`benchmarks/bench_history_read.py`)."""
        with self.engine.connect() as conn:
            if self.backend == "postgresql":
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            rows = conn.execute(_RECENT_EVENTS, {"user_id": user_id, "limit": limit}).all()
        rows.sort(key=lambda r: (r[2], r[3] is None, r[3] or 0, r[4]))
        return [(r[0], r[1], float(r[2])) for r in rows]

    def events_since(self, since: float, until: float | None = None,
                     limit: int | None = None) -> pd.DataFrame:
        """Events with since <= timestamp (< until), in time order (by event time, not arrival)."""
        q = select(*_event_columns()).where(events_t.c.timestamp >= since)
        if until is not None:
            q = q.where(events_t.c.timestamp < until)
        q = q.order_by(events_t.c.timestamp, events_t.c.ingest_seq)
        return self._events_frame(q.limit(limit) if limit is not None else q)

    def new_events(self, after: int = 0, limit: int | None = None) -> tuple[pd.DataFrame, int]:
        """Events stored after the ingestion cursor `after`, in arrival order, and the cursor to pass next.

        Start from 0; the returned cursor is the last event's `ingest_seq` (or `after` when nothing new).
        A reader never misses an event that commits later with a smaller cursor (see `_take_seq`).
        """
        q = select(*_event_columns()).where(events_t.c.ingest_seq > after).order_by(events_t.c.ingest_seq)
        df = self._events_frame(q.limit(limit) if limit is not None else q)
        return df, int(df["ingest_seq"].iloc[-1]) if len(df) else after

    def new_impressions(self, after: int = 0, limit: int | None = None) -> tuple[list[Impression], int]:
        """Impressions stored after the ingestion cursor `after`, in arrival order, and the next cursor."""
        seq = impressions_t.c.ingest_seq
        q = select(impressions_t).where(seq > after).order_by(seq)
        with self.engine.connect() as conn:
            heads = conn.execute(q.limit(limit) if limit is not None else q).mappings().all()
            found = self._assemble(conn, heads)
        return found, int(heads[-1]["ingest_seq"]) if heads else after

    def impression(self, request_id: str) -> Impression | None:
        """The impression of a request id, or None."""
        found = self.impressions(request_ids=[request_id])
        return found[0] if found else None

    def impressions(self, user_id: str | None = None, since: float | None = None, until: float | None = None,
                    request_ids: Iterable[str] | None = None, limit: int | None = None) -> list[Impression]:
        """Impressions (with their items, scores, sources, propensities), oldest first, filtered by user,
        shown time (since <= t < until) and request ids."""
        ids = None if request_ids is None else list(dict.fromkeys(request_ids))
        with self.engine.connect() as conn:
            heads = []
            for chunk in _chunks(ids) if ids is not None else [None]:
                q = select(impressions_t)
                if chunk is not None:
                    q = q.where(impressions_t.c.request_id.in_(chunk))
                if user_id is not None:
                    q = q.where(impressions_t.c.user_id == user_id)
                if since is not None:
                    q = q.where(impressions_t.c.created_at >= since)
                if until is not None:
                    q = q.where(impressions_t.c.created_at < until)
                q = q.order_by(impressions_t.c.created_at, impressions_t.c.ingest_seq)
                heads.extend(conn.execute(q.limit(limit) if limit is not None else q).mappings().all())
            if ids is not None and len(ids) > _IN_CHUNK:
                heads.sort(key=lambda h: (h["created_at"] is None, h["created_at"] or 0.0, h["ingest_seq"]))
            return self._assemble(conn, heads[:limit] if limit is not None else heads)

    def events_answering(self, request_ids: Iterable[str]) -> pd.DataFrame:
        """The events that answer these request ids, by request then time."""
        frames = []
        for chunk in _chunks(list(dict.fromkeys(request_ids))):
            q = (select(*_event_columns()).where(events_t.c.request_id.in_(chunk))
                 .order_by(events_t.c.request_id, events_t.c.timestamp, events_t.c.ingest_seq))
            frames.append(self._events_frame(q))
        if not frames:
            return _empty_events()
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def feedback(self, user_id: str | None = None, since: float | None = None, until: float | None = None,
                 request_ids: Iterable[str] | None = None, limit: int | None = None) -> list[Feedback]:
        """Impressions (filtered as in `impressions`) each with the events that answer it."""
        imps = self.impressions(user_id, since, until, request_ids, limit)
        answers = self.events_answering([i.request_id for i in imps])
        by_request: dict[str, list[Event]] = {}
        for row in answers.itertuples(index=False):
            by_request.setdefault(row.request_id, []).append(_to_event(row))
        return [Feedback(i, by_request.get(i.request_id, [])) for i in imps]

    def counts(self) -> StoreCounts:
        """How many events, impressions, shown slots, users and items the store holds."""
        with self.engine.connect() as conn:
            ev = events_t.c
            n_events, users, items = conn.execute(select(
                func.count(), func.count(ev.user_id.distinct()), func.count(ev.item_id.distinct()))).one()
            n_imps = conn.execute(select(func.count()).select_from(impressions_t)).scalar_one()
            n_slots = conn.execute(select(func.count()).select_from(slots_t)).scalar_one()
            answered = conn.execute(select(func.count(impressions_t.c.request_id.distinct())).select_from(
                impressions_t.join(events_t, ev.request_id == impressions_t.c.request_id))).scalar_one()
            by_action = dict(conn.execute(select(ev.action, func.count()).group_by(ev.action)).all())
        return StoreCounts(int(n_events), int(n_imps), int(n_slots), int(users), int(items), int(answered),
                           {str(k): int(v) for k, v in sorted(by_action.items())})

    def all_events(self) -> pd.DataFrame:
        """Every event, sorted by user, time, explicit order, then arrival."""
        ev = events_t.c
        q = select(*_event_columns()).order_by(ev.user_id, ev.timestamp, ev.ingest_seq)
        return _time_ordered(self._events_frame(q), by_user=True)

    # --- helpers ------------------------------------------------------------------------------------

    def _events_frame(self, q: Select) -> pd.DataFrame:
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return _events_frame(rows)

    def _assemble(self, conn: Connection, heads: list) -> list[Impression]:
        """Impressions from their head rows plus their item rows, in the order of `heads`."""
        slots: dict[str, list] = {}
        for chunk in _chunks([h["request_id"] for h in heads]):
            q = (select(slots_t).where(slots_t.c.request_id.in_(chunk))
                 .order_by(slots_t.c.request_id, slots_t.c.position))
            for s in conn.execute(q).mappings():
                slots.setdefault(s["request_id"], []).append(s)
        out = []
        for h in heads:
            items = slots.get(h["request_id"], [])

            def column(name: str, items=items) -> list | None:
                values = [s[name] for s in items]
                return values if any(v is not None for v in values) else None  # None: no slot has one

            out.append(Impression(request_id=h["request_id"], user_id=h["user_id"],
                                  item_ids=[s["item_id"] for s in items], model_version=h["model_version"],
                                  pipeline=h["pipeline"], timestamp=h["created_at"], scores=column("score"),
                                  sources=column("source"), propensities=column("propensity")))
        return out


def _event_columns():
    c = events_t.c
    return (c.user_id, c.item_id, c.action, c.timestamp, c.request_id, c.value, c.session_id,
            c.event_order.label("order"), c.event_id, c.ingested_at, c.ingest_seq)


def _events_frame(rows) -> pd.DataFrame:
    """Rows of `_event_columns()` as a DataFrame with the readers' dtypes (NaN for missing numbers)."""
    cols = list(zip(*rows)) if rows else [()] * len(EVENT_READ_COLUMNS)
    data = {}
    for name, values in zip(EVENT_READ_COLUMNS, cols):
        if name in ("timestamp", "value", "order", "ingested_at"):
            data[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        elif name == "ingest_seq":
            data[name] = np.array(values, dtype=np.int64)
        else:
            data[name] = np.array(values, dtype=object)
    return pd.DataFrame(data)


def _time_ordered(df: pd.DataFrame, by_user: bool = False) -> pd.DataFrame:
    """Sorted as the readers sort: (user,) time, explicit order (missing last), then arrival (the input's
    order, which the callers make arrival order). Done here, not in SQL: the backends sort NULLs apart."""
    keys = ["user_id", "timestamp", "order"] if by_user else ["timestamp", "order"]
    return df.sort_values(keys, kind="stable", na_position="last", ignore_index=True)


def _empty_events() -> pd.DataFrame:
    return _events_frame([])


def _to_event(row) -> Event:
    return Event(user_id=row.user_id, item_id=row.item_id, action=row.action, timestamp=row.timestamp,
                 request_id=row.request_id, value=None if pd.isna(row.value) else row.value,
                 session_id=row.session_id)


def _first_of_each(rows: list, key) -> tuple[list, int]:
    """The rows with the first of each key kept, and how many repeats were dropped."""
    seen: dict = {}
    for r in rows:
        seen.setdefault(key(r), r)
    return list(seen.values()), len(rows) - len(seen)


def _chunks(ids: list | None) -> Iterator[list]:
    if not ids:
        return
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i:i + _IN_CHUNK]
