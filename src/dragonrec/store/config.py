"""The store's settings: connection behaviour and what a write accepts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StoreConfig(BaseModel):
    """How the store connects and what it accepts; defaults suit an embedded SQLite file on a laptop."""

    model_config = ConfigDict(frozen=True)

    busy_timeout_s: float = Field(30.0, ge=0)
    """SQLite: how long a writer waits for another writer's lock before failing with 'database is locked'."""
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    """SQLite fsync policy. NORMAL with WAL survives a crash of the process; FULL also a power cut."""
    require_known_request: bool = False
    """Refuse an event whose request_id names no stored impression. Off by default: a client's events may
    reach the store before the server's impression does, and refusing them would lose real feedback."""
    migrate: bool = True
    """Bring the schema to the latest migration on open (safe with several processes opening at once)."""
    echo: bool = False
    """Log every SQL statement (debugging)."""
    pool_size: int = Field(10, ge=1)
    """PostgreSQL: connections kept open per process, and with `max_overflow` 0 the most it uses at once."""
    max_overflow: int = Field(0, ge=0)
    """PostgreSQL: connections opened beyond `pool_size` for a burst and closed again when handed back. Each
    is a new server backend (a fork, authentication, a first query planned from scratch): under sustained
    load the overflow opens and closes them continuously (443 in 15 s of an overloaded level in
    `benchmarks/bench_load.py`), spending CPU the overloaded machine lacks. 0: a burst waits for a pooled
    connection instead (at most `pool_timeout_s`; then the service answers 503)."""
    pool_timeout_s: float = Field(30.0, gt=0)
    """PostgreSQL: how long a caller waits for a free pooled connection before the store raises."""
    pool_pre_ping: bool = False
    """PostgreSQL: test each pooled connection with a round trip before every use. Off: a request pays no
    extra round trip, and a connection the server dropped (a restart, a killed backend) fails the one
    request that meets it (`OperationalError`, the service answers 503 with Retry-After) while the pool is
    refilled with fresh connections for the next."""
