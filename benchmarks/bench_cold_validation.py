"""Cold users on VALIDATION, to choose the served defaults for visitors with no positive event who state a
category, and for nearly cold users (one or two events): the co-occurrence-scored union pipeline of
`bench_cold.py`, every validation case of Amazon Beauty (or a seeded sample), each pair of settings compared case
by case (mean NDCG@10 difference and its standard error).

    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cold_validation.py \
        --data ../shared/data/amazon-beauty --out benchmarks/results/cold_users_validation.json

- 0 events + a stated category (level 2 of the category path of the user's latest event, as the storefront asks):
  popularity in that segment (`ColdStartConfig.segment=True`), the dense preference query (False), and the plain
  cold list a visitor who states nothing gets.
- 1 and 2 events: the scorer's order (`dense_weight` 0) against the content weight `bench_cold.py` chose on
  validation (0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_cold import configs, offline, online  # the same pipelines and slices
from bench_tune import paired_difference  # B against A case by case

from dragonrec.candidates.cold import ColdStartConfig
from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate.metrics import ndcg_at_k
from dragonrec.rerank import category_key


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """b - a, case by case (target ranks of the same cases): mean NDCG@10 difference, its standard error and z."""
    d = paired_difference([a], [b])
    return {k: d[k] for k in ("difference", "se", "z")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--users", type=int, default=0, help="validation cases sampled (seeded); 0: all of them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-weight", type=float, default=0.1, help="the content weight to check (bench_cold's choice)")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--out", default="benchmarks/results/cold_users_validation.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    cases = split.valid
    if args.users:
        pick = np.sort(np.random.default_rng(args.seed).choice(len(cases), min(args.users, len(cases)), replace=False))
        cases = cases.subset(pick)
    paths = ds.catalog.categories
    stated = []
    for h in cases.histories:
        key = category_key(paths[int(h[-1])], 2) if len(h) else ""
        stated.append({"preferences": {"categories": [key.split(">")[-1].strip()]}} if key else {})

    from dragonrec.pipeline import Pipeline

    cfg = configs(DenseConfig(cache_dir=args.cache_dir), None)["pipeline (union, co-occurrence scorer)"]
    pipe = Pipeline(cfg).fit(split.train, ds.catalog)
    ranks: dict[str, np.ndarray] = {}
    for name, cold in (("0 events + category: segment popularity", ColdStartConfig(segment=True)),
                       ("0 events + category: dense query", ColdStartConfig(segment=False))):
        pipe.cfg = cfg.model_copy(update={"cold_start": cold})
        ranks[name] = online(pipe, stated, cases.targets)
    pipe.cfg = cfg
    ranks["0 events, nothing stated"] = online(pipe, [{}] * len(cases), cases.targets)
    for w in (0.0, args.dense_weight):
        pipe.cfg = cfg.model_copy(update={"cold_start": ColdStartConfig(dense_weight=w)})
        for k in (1, 2):
            ranks[f"{k} event{'s' if k > 1 else ''}, dense weight {w}"] = offline(
                pipe, [h[-k:] for h in cases.histories], [a[-k:] for a in cases.actions], cases.targets)
    table = {name: {"ndcg@10": ndcg_at_k(r, 10), "hits@10": int((r <= 10).sum()), "cases": len(r)}
             for name, r in ranks.items()}
    comparisons = {
        "segment - dense query": paired(ranks["0 events + category: dense query"],
                                        ranks["0 events + category: segment popularity"]),
        "segment - nothing stated": paired(ranks["0 events, nothing stated"],
                                           ranks["0 events + category: segment popularity"]),
    }
    for k in ("1 event", "2 events"):
        comparisons[f"{k}: dense weight {args.dense_weight} - 0"] = paired(
            ranks[f"{k}, dense weight 0.0"], ranks[f"{k}, dense weight {args.dense_weight}"])
    for name, m in table.items():
        print(f"{name}: NDCG@10 {m['ndcg@10']:.4f} ({m['hits@10']} hits of {m['cases']})")
    for name, c in comparisons.items():
        print(f"{name}: {c['difference']:+.4f} ± {c['se']:.4f} (z {c['z']:.1f})")
    out = {"data": args.data, "part": "validation", "split": "leave-one-out, history excluded",
           "users": len(cases), "seed": args.seed, "pipeline": "union, co-occurrence scorer", "table": table,
           "paired": comparisons, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
