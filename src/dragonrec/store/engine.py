"""Database URLs and engines: SQLite (WAL, busy timeout, foreign keys on every connection) or PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from dragonrec.store.config import StoreConfig


def normalize_url(url: str | Path) -> str:
    """A SQLAlchemy URL for a store: a bare path means a SQLite file; `postgresql://` means psycopg 3.

    'feedback.db' -> 'sqlite:///feedback.db'; 'postgresql://u@h/db' -> 'postgresql+psycopg://u@h/db'.
    """
    text = str(url)
    if "://" not in text:
        return f"sqlite:///{Path(text)}"
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    return text


def make_engine(url: str | Path, config: StoreConfig | None = None) -> Engine:
    """An engine for the store at `url`; raises ValueError for a backend the store does not support."""
    config = config or StoreConfig()
    url = normalize_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=config.echo, connect_args={"timeout": config.busy_timeout_s})
        _configure_sqlite(engine, config)
        return engine
    if backend == "postgresql":
        return create_engine(url, echo=config.echo, pool_size=config.pool_size, max_overflow=config.max_overflow,
                             pool_timeout=config.pool_timeout_s, pool_pre_ping=config.pool_pre_ping)
    shown = make_url(url).render_as_string(hide_password=True)  # an error message must not carry the password
    raise ValueError(f"unsupported store URL {shown!r}: use sqlite:///PATH or "
                     "postgresql+psycopg://USER@HOST/DB")


def _configure_sqlite(engine: Engine, config: StoreConfig) -> None:
    busy_ms = int(config.busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        cur = dbapi_connection.cursor()
        # One writer at a time: the others wait up to the busy timeout instead of failing at once (set
        # first: switching a new file to WAL needs the lock too). WAL: readers and the writer never block
        # each other.
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        _enable_wal(cur, config.busy_timeout_s)
        cur.execute(f"PRAGMA synchronous={config.sqlite_synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")  # SQLite leaves them off unless asked, per connection
        cur.close()


def _enable_wal(cur, timeout_s: float) -> None:
    """Switch the file to WAL (a persistent setting; a no-op once done).

    Switching needs an exclusive lock, and SQLite answers 'database is locked' at once, without the busy
    handler, when two connections race to switch a new file: retry until the busy timeout has passed.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
