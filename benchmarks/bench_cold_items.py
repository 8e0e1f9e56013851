"""Cold items on Amazon Beauty: HR@10 and NDCG@10 of every pipeline on test cases whose target is a cold item
(held out of training: nobody interacted with it before), beside the warm-target cases.

    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cold_items.py --data ../shared/data/amazon-beauty \
        --warm 2000 --out benchmarks/results/cold_items_pipelines.json

The `cold-item` split (`dragonrec.data.cold_item_split`, 5 % of the items, seed 0): their events leave the
training set; validation keeps only warm targets; the test cases whose target is cold form the `cold` slice
(every one of them is scored), a fixed random sample of the others the `warm` slice. History excluded.
Every pipeline is fitted on the split's training events only. A generative model trained on the same split
(`--generative DIR`, e.g. from `bench_sequential.py --split cold-item --save DIR`) adds the union pipeline
scored by it; the cold head's own numbers are in docs/benchmarks.md.
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

from bench_cold import configs, metrics, offline  # the same pipelines as the cold-user benchmark

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import cold_item_split, load_dataset
from dragonrec.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--warm", type=int, default=2000, help="warm-target test cases sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--generative", default="", help="a generative model trained on this cold-item split")
    ap.add_argument("--out", default="benchmarks/results/cold_items_pipelines.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = cold_item_split(ds.events, seed=args.seed)
    cold = np.flatnonzero(split.slices["cold_item"])
    warm_all = np.flatnonzero(~split.slices["cold_item"])
    warm = np.sort(np.random.default_rng(args.seed).choice(warm_all, min(args.warm, len(warm_all)), replace=False))
    cases = {"cold": split.test.subset(cold), "warm": split.test.subset(warm)}
    print(f"{split.info['cold_items']} cold items, {len(cold)} cold-target and {len(warm)} warm test cases",
          flush=True)
    generative = args.generative if args.generative and Path(args.generative, "recommender.json").exists() else None
    results = {}
    for name, cfg in configs(DenseConfig(cache_dir=args.cache_dir), generative).items():
        t1 = time.perf_counter()
        pipe = Pipeline(cfg).fit(split.train, ds.catalog)
        res = {k: metrics(offline(pipe, c.histories, c.actions, c.targets)) for k, c in cases.items()}
        res["cold / warm hr@10"] = res["cold"]["hr@10"] / res["warm"]["hr@10"] if res["warm"]["hr@10"] else None
        results[name] = res
        print(f"{name}: warm hr {res['warm']['hr@10']:.4f} ndcg {res['warm']['ndcg@10']:.4f}; cold hr "
              f"{res['cold']['hr@10']:.4f} ndcg {res['cold']['ndcg@10']:.4f} ({time.perf_counter() - t1:.0f}s)",
              flush=True)
    out = {"data": args.data, "split": f"cold-item (5 % of items, seed {args.seed}), history excluded",
           "cold_items": split.info["cold_items"], "cold_cases": len(cold), "warm_cases": len(warm),
           "generative": generative, "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
