"""A throwaway PostgreSQL server in a temporary directory, for tests and benchmarks of the store.

    with TempPostgres() as pg:
        store = Store.open(create_database(pg.url, "t1"))

Uses the machine's PostgreSQL binaries (Debian: `apt-get install -y postgresql`, found under
/usr/lib/postgresql/*/bin). PostgreSQL refuses to run as root: as root, the server runs as the `postgres`
user through `runuser`, in a directory handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from sqlalchemy import create_engine, text


def find_pg_bin() -> Path | None:
    """The directory holding `initdb` and `pg_ctl` (newest Debian version first, then PATH), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version(Path(p).parent.name),
                        reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TempPostgres:
    """A PostgreSQL server on 127.0.0.1 and a free port, in a temporary directory removed on `stop`."""

    fsync: bool = False
    """Flush commits to disk. Off for tests (fast, nothing to keep); on to measure real commit costs."""
    bin_dir: Path | None = None
    """Where initdb and pg_ctl are (default: `find_pg_bin()`)."""
    port: int = 0
    """The port (0: a free one)."""
    settings: dict[str, str] = field(default_factory=dict)
    """More server settings (`-c name=value`), e.g. {"synchronous_commit": "off"}."""
    directory: Path | None = field(default=None, init=False)
    url: str | None = field(default=None, init=False)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        # initdb and postgres refuse root: as root, run them as the `postgres` user.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        proc = subprocess.run([*prefix, *args], check=False, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {detail}")
        return proc

    def start(self) -> str:
        """Start the server; returns the admin URL (user postgres, database postgres, trust auth)."""
        bin_dir = self.bin_dir or find_pg_bin()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found: install PostgreSQL "
                                    "(Debian: apt-get install -y postgresql)")
        self.bin_dir = Path(bin_dir)
        self.directory = Path(tempfile.mkdtemp(prefix="dragonrec-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        data = self.directory / "data"
        self._run(str(self.bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                  "--no-sync", "--encoding=UTF8", "--locale=C")
        self.port = self.port or free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory}"
                f" -c fsync={'on' if self.fsync else 'off'}")
        if not self.fsync:
            opts += " -c synchronous_commit=off -c full_page_writes=off"
        opts += "".join(f" -c {k}={v}" for k, v in self.settings.items())
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-l", str(self.directory / "server.log"),
                  "-w", "-t", "60", "-o", opts, "start")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        return self.url

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if self.directory is None:
            return
        try:
            if (self.directory / "data" / "postmaster.pid").exists():
                pg_ctl = str(self.bin_dir / "pg_ctl")
                self._run(pg_ctl, "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = self.url = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def create_database(admin_url: str, name: str) -> str:
    """Create an empty database `name` on the server of `admin_url` (its user may create databases);
    returns the new database's URL."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return str(engine.url.set(database=name).render_as_string(hide_password=False))


def drop_database(admin_url: str, name: str, attempts: int = 3) -> None:
    """Drop database `name`, closing any connection still open to it."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        for attempt in range(attempts):
            try:
                with engine.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                return
            except Exception:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2)
    finally:
        engine.dispose()
