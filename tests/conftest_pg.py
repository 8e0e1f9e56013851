"""A real PostgreSQL server for the store tests: one per test session, an empty schema per test.

Import the fixtures into a test module (`from conftest_pg import postgres_admin_url, postgres_url`).
`DRAGONREC_TEST_POSTGRES_URL` (a database where the user may create schemas) is used instead of starting one.
Without PostgreSQL binaries the PostgreSQL cases fail under CI (`CI` set: CI must really test them) and
are skipped elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dragonrec.store.engine import normalize_url
from dragonrec.store.pgtemp import TempPostgres, find_pg_bin


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """The admin URL of a PostgreSQL server that lives as long as the test session."""
    given = os.environ.get("DRAGONREC_TEST_POSTGRES_URL")
    if given:
        yield normalize_url(given)
        return
    if find_pg_bin() is None:
        message = ("PostgreSQL binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on "
                   "PATH: install them (Debian: apt-get install -y postgresql; .ci/run does) or set "
                   "DRAGONREC_TEST_POSTGRES_URL")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = TempPostgres(fsync=False)
    try:
        server.start()
    except Exception as e:
        if server.directory is not None:
            log = server.directory / "server.log"
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            server.stop()
            raise RuntimeError(f"{e}\n{detail}") from e
        raise
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """The URL of an empty schema of its own (first on the search path), dropped after the test.

    A schema, not a database: CREATE DATABASE copies a template (about 0.5 s); CREATE SCHEMA takes 1 ms.
    """
    schema = f"dragonrec_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(postgres_admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()
