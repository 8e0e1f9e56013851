"""Shared by the service tests: a real slice of Amazon Beauty, tiny trained models, a server on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx
import pandas as pd
from conftest import shared_dataset

API_KEY = "test-key-0123456789abcdef"
OLD_KEY = "old-key-0123456789abcdef0"


def beauty_slice(out: Path, n_items: int = 2000, max_users: int | None = None) -> Path:
    """A dataset directory with Beauty's `n_items` most popular items (their real text) and the events on
    them of users left with at least two (the first `max_users` of them, if given)."""
    src = shared_dataset("amazon-beauty")
    items = pd.read_parquet(src / "items.parquet")
    events = pd.read_parquet(src / "interactions.parquet")
    popular = events.groupby("item_id")["user_id"].nunique().sort_values(ascending=False, kind="stable")
    keep = set(popular.index[:n_items])
    events = events[events["item_id"].isin(keep)]
    counts = events["user_id"].value_counts()
    users = sorted(counts[counts >= 2].index)
    if max_users is not None:
        users = users[:max_users]
    events = events[events["user_id"].isin(set(users))]
    items = items[items["item_id"].isin(set(events["item_id"]))]
    out.mkdir(parents=True, exist_ok=True)
    items.to_parquet(out / "items.parquet", index=False)
    events.to_parquet(out / "interactions.parquet", index=False)
    return out


def train_tiny(data_dir: Path, out: Path, seed: int = 0, recommender: str = "sasrec") -> Path:
    """A tiny sequence model fitted for one epoch on a dataset directory and saved (a registry version)."""
    from dragonrec.data import load_dataset
    from dragonrec.recommenders import build

    ds = load_dataset(data_dir)
    model = build(recommender, {"hidden_size": 16, "num_layers": 1, "max_len": 20, "max_epochs": 1,
                                "refit_with_valid": False, "progress": False, "quiet": True, "max_minutes": None,
                                "warmup_steps": 0, "batch_size": 256, "seed": seed, "text_cache_dir": None})
    model.fit(ds.events, ds.catalog)
    model.save(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m uvicorn dragonrec.serve.app:app_from_env` on 127.0.0.1 and a free port, settings from env."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "dragonrec.serve.app:app_from_env", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer /health in 120 s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
