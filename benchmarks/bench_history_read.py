"""The request path's history read (`Store.recent_events`) on PostgreSQL, as it is (one autocommitted statement)
against the same SELECT inside a transaction (BEGIN, the SELECT, the pool's ROLLBACK on return), in turns.

    .venv/bin/python benchmarks/bench_history_read.py [--rounds 6] [--reads 500]

A local server with fsync on (`TempPostgres`), 2,000 events of 50 users; each round reads 500 histories
(limit 50) both ways. Prints the medians over rounds of milliseconds per read: wall clock and this process's CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dragonrec.store import Store
from dragonrec.store.pgtemp import TempPostgres
from dragonrec.store.store import _RECENT_EVENTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reads", type=int, default=500)
    args = ap.parse_args()
    with TempPostgres(fsync=True) as pg, Store.open(pg.url) as store:
        store.add_events([{"event_id": f"e{i}", "user_id": f"u{i % 50}", "item_id": f"i{i % 30}", "action": "view",
                           "timestamp": 1e9 + i} for i in range(2000)])

        def in_transaction(i: int) -> None:
            with store.engine.connect() as conn:
                conn.execute(_RECENT_EVENTS, {"user_id": f"u{i % 50}", "limit": 50}).all()

        def as_served(i: int) -> None:
            store.recent_events(f"u{i % 50}", 50)

        runs: dict[str, list[tuple[float, float]]] = {"in_transaction": [], "autocommit": []}
        for _ in range(args.rounds):
            for name, read in (("in_transaction", in_transaction), ("autocommit", as_served)):
                t, c = time.perf_counter(), time.process_time()
                for i in range(args.reads):
                    read(i)
                runs[name].append((1000 * (time.perf_counter() - t) / args.reads,
                                   1000 * (time.process_time() - c) / args.reads))
    out = {name: {"wall_ms": round(float(np.median([w for w, _ in v])), 3),
                  "client_cpu_ms": round(float(np.median([c for _, c in v])), 3)} for name, v in runs.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
