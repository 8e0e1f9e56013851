"""Impression writes on PostgreSQL (fsync on) under the conditions of a busy API worker: serial writes, then two
writer threads beside a thread that keeps the interpreter busy (as a request's scoring does), latency per write.

    .venv/bin/python benchmarks/bench_store_contention.py [--writes 400] [--out FILE]

Run it on two commits to compare store versions (docs/load.md compared a287d9d with the one-statement write).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from dragonrec.schema import Impression
from dragonrec.store import Store
from dragonrec.store.pgtemp import TempPostgres


def impression() -> Impression:
    return Impression(request_id=uuid.uuid4().hex, user_id="u", item_ids=[f"i{j}" for j in range(10)],
                      scores=[0.0] * 10, sources=["model"] * 10, propensities=[1.0] * 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=400, help="serial writes; each writer thread makes half as many")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with TempPostgres(fsync=True) as pg, Store.open(pg.url) as store:
        for _ in range(50):  # warm the pool and the statement caches
            store.add_impressions([impression()])
        t = time.perf_counter()
        for _ in range(args.writes):
            store.add_impressions([impression()])
        serial_ms = 1000 * (time.perf_counter() - t) / args.writes
        stop = threading.Event()

        def busy() -> None:  # pure Python: holds the GIL for a switch interval at a time
            x = 0
            while not stop.is_set():
                for i in range(20_000):
                    x += i

        lat: list[float] = []

        def writer() -> None:
            for _ in range(args.writes // 2):
                t = time.perf_counter()
                store.add_impressions([impression()])
                lat.append(time.perf_counter() - t)

        b = threading.Thread(target=busy)
        b.start()
        ws = [threading.Thread(target=writer) for _ in range(2)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        stop.set()
        b.join()
    ms = np.asarray(lat) * 1000
    out = {"serial_ms_per_write": round(serial_ms, 2), "contended_writes": len(ms),
           "contended_p50_ms": round(float(np.median(ms)), 1), "contended_p99_ms": round(float(np.percentile(ms, 99)), 1),
           "contended_max_ms": round(float(ms.max()), 1)}
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
