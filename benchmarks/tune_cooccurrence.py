"""Grid-search the co-occurrence recommender on the VALIDATION split (never test) and print the ranking.

Run: .venv/bin/python benchmarks/tune_cooccurrence.py --data ../shared/data/amazon-beauty
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate import evaluate_cases
from dragonrec.recommenders.cooccurrence import CooccurrenceConfig, CooccurrenceRecommender

GRID = {"window": [1, 2, 3, 5], "last_n": [1, 2, 3, 5], "backward_weight": [0.25, 0.5, 1.0], "alpha": [0.0, 0.5]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    rows = []
    t0 = time.time()
    for values in itertools.product(*GRID.values()):
        cfg = CooccurrenceConfig(**dict(zip(GRID, values)))
        model = CooccurrenceRecommender(cfg).fit(split.train, ds.catalog)
        m = evaluate_cases(model, split.valid)["metrics"]
        rows.append((m["ndcg@10"], m["hr@10"], dict(zip(GRID, values))))
    rows.sort(key=lambda r: -r[0])
    for ndcg, hr, cfg in rows[:10]:
        print(f"valid ndcg@10 {ndcg:.4f} hr@10 {hr:.4f} {json.dumps(cfg)}")
    print(f"{len(rows)} configs in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
