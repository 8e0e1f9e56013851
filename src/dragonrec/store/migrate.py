"""Alembic migrations of the store, run from the package (no alembic.ini, no repository checkout needed).

Several processes may open a new store at once: the migration runs under a lock (SQLite: BEGIN IMMEDIATE;
PostgreSQL: a transaction-scoped advisory lock) and in one transaction, so exactly one of them migrates.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x647261676F6E  # "dragon": any fixed 64-bit key shared by every dragonrec process


def alembic_config() -> Config:
    """An Alembic config pointing at the migrations shipped in this package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to `revision` (default: the newest), under a lock, in one transaction."""
    if revision == "head" and current_revision(engine) == head_revision():
        return  # the common case: already there, no lock taken
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            # pysqlite would otherwise open a deferred transaction; IMMEDIATE takes the write lock first, so
            # a second migrating process waits (busy timeout) and then finds the schema at head.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database back to `revision` ("base": no tables), in one transaction."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()
