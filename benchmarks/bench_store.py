"""Feedback-store ingestion speed: events per second, one event per write and in batches, on SQLite and on
PostgreSQL, with real user and item ids from a dataset and a realistic mix of actions.

    flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_store.py \\
        --data ../shared/data/amazon-beauty --out benchmarks/results/store.json

Per backend: `single` (one `add_events` call, so one transaction, per event), `batched` (`--batch` events a
call), `retried` (the batched events sent again: all duplicates, the idempotency path), `impressions` (one
10-item impression a call), and reads (`export_events` of everything, one user's history). SQLite is a
file with WAL and synchronous=NORMAL (the store's default: a commit is not flushed to disk at once);
PostgreSQL is a local server started for the run with fsync on, reached over TCP on 127.0.0.1, once with
its default synchronous_commit=on (every commit waits for its disk flush) and once with it off (the same
durability as SQLite's NORMAL).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dragonrec.schema import Impression
from dragonrec.store import Store, export_events
from dragonrec.store.pgtemp import TempPostgres

# A storefront's mix: mostly views and scroll-pasts, few purchases (shares sum to 1).
ACTION_MIX = {"view": 0.45, "hover": 0.12, "click": 0.12, "scroll_past": 0.18, "add_to_cart": 0.06,
              "remove_from_cart": 0.02, "purchase": 0.04, "review": 0.01}


def make_events(data: Path, n: int, seed: int) -> list[dict]:
    """n events over real (user, item) pairs of the dataset, with sampled actions, request ids and values."""
    rng = np.random.default_rng(seed)
    real = pd.read_parquet(data / "interactions.parquet", columns=["user_id", "item_id", "timestamp"])
    rows = real.iloc[rng.choice(len(real), size=n, replace=len(real) < n)].reset_index(drop=True)
    actions = rng.choice(list(ACTION_MIX), size=n, p=list(ACTION_MIX.values()))
    answers = rng.random(n) < 0.6  # most storefront events answer a shown list
    out = []
    for i, (row, action, answered) in enumerate(zip(rows.itertuples(index=False), actions, answers)):
        value = float(rng.integers(200, 20_000)) if action in ("view", "hover") else (
            float(rng.integers(1, 6)) if action == "review" else None)
        out.append({"user_id": row.user_id, "item_id": row.item_id, "action": str(action),
                    # real day + a distinct second, so that no two sampled events are the same event
                    "timestamp": float(row.timestamp) + i, "value": value,
                    "request_id": f"req-{i // 10}" if answered else None, "session_id": f"s-{row.user_id}"})
    return out


def make_impressions(events: list[dict], n: int, seed: int) -> list[Impression]:
    rng = np.random.default_rng(seed)
    items = np.unique([e["item_id"] for e in events])
    return [Impression(request_id=f"imp-{k}", user_id=events[k % len(events)]["user_id"],
                       item_ids=rng.choice(items, size=10, replace=False).tolist(), model_version="bench",
                       pipeline="rag", timestamp=1.4e9 + k, scores=np.sort(rng.random(10))[::-1].tolist(),
                       sources=["dense"] * 5 + ["cooccurrence"] * 5, propensities=[0.1] * 10)
            for k in range(n)]


def rate(n: int, seconds: float) -> dict:
    return {"n": n, "seconds": round(seconds, 3), "per_second": round(n / seconds, 1)}


def run_backend(url: str, events: list[dict], n_single: int, batch: int,
                impressions: list[Impression]) -> dict:
    out: dict = {}
    with Store.open(url) as store:
        single, batched = events[:n_single], events[n_single:]
        t = time.perf_counter()
        for e in single:
            store.add_events([e])
        out["single"] = rate(len(single), time.perf_counter() - t)
        t = time.perf_counter()
        accepted = sum(store.add_events(batched[i:i + batch])[0] for i in range(0, len(batched), batch))
        out["batched"] = rate(len(batched), time.perf_counter() - t) | {"batch": batch}
        assert accepted == len(batched), (accepted, len(batched))
        t = time.perf_counter()
        dup = sum(store.add_events(batched[i:i + batch])[1] for i in range(0, len(batched), batch))
        out["retried"] = rate(len(batched), time.perf_counter() - t) | {"batch": batch}
        assert dup == len(batched)
        t = time.perf_counter()
        for imp in impressions:
            store.add_impression(imp)
        out["impressions"] = rate(len(impressions), time.perf_counter() - t) | {"slots_each": 10}
        t = time.perf_counter()
        df = export_events(store)
        out["export_events"] = rate(len(df), time.perf_counter() - t)
        user = events[0]["user_id"]
        t = time.perf_counter()
        for _ in range(100):
            store.events_of_user(user, limit=50)
        out["user_history_ms"] = round((time.perf_counter() - t) * 10, 3)
        counts = store.counts()
        assert counts.events == len(events) and counts.impressions == len(impressions)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/amazon-beauty"))
    ap.add_argument("--events", type=int, default=20_000, help="events in all (single + batched)")
    ap.add_argument("--single", type=int, default=2_000, help="of them, written one per call")
    ap.add_argument("--batch", type=int, default=1_000, help="events per batched call")
    ap.add_argument("--impressions", type=int, default=1_000)
    ap.add_argument("--backends", default="sqlite,postgresql,postgresql_async_commit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/store.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    events = make_events(args.data, args.events, args.seed)
    impressions = make_impressions(events, args.impressions, args.seed)
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "action_mix": ACTION_MIX,
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                results["sqlite"] = run_backend(f"sqlite:///{tmp}/bench.db", events, args.single, args.batch,
                                                impressions)
            elif backend == "postgresql":
                with TempPostgres(fsync=True) as pg:
                    results[backend] = run_backend(pg.url, events, args.single, args.batch, impressions)
                    results[backend]["settings"] = "local server, fsync on, TCP 127.0.0.1"
            elif backend == "postgresql_async_commit":
                # What SQLite's synchronous=NORMAL gives: a commit does not wait for its WAL flush, so a
                # power cut (not a crash) may lose the last commits; the database stays consistent.
                with TempPostgres(fsync=True, settings={"synchronous_commit": "off"}) as pg:
                    results[backend] = run_backend(pg.url, events, args.single, args.batch, impressions)
                    results[backend]["settings"] = "local server, fsync on, synchronous_commit off"
            else:
                raise SystemExit(f"unknown backend {backend!r}")
            print(backend, json.dumps(results[backend]), flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} in {results['seconds']} s")


if __name__ == "__main__":
    main()
