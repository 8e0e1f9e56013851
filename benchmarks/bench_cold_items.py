"""Cold items on Amazon Beauty: HR@10 and NDCG@10 of every pipeline on test cases whose target is a cold item
(held out of training: nobody interacted with it before), beside the warm-target cases.

    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cold_items.py --data ../shared/data/amazon-beauty \
        --warm 2000 --out benchmarks/results/cold_items_pipelines.json

The `cold-item` split (`dragonrec.data.cold_item_split`, 5 % of the items, seed 0): their events leave the
training set; validation keeps only warm targets; the test cases whose target is cold form the `cold` slice
(every one of them is scored), a fixed random sample of the others the `warm` slice; "all" weighs the two by
their shares of the whole test set. History excluded. The union pipelines are also run with slots for new
items (`RerankConfig.cold_item_slots`: the candidates nobody interacted with, closest in text to the history,
moved up to end on position 10): a merchant's knob, reported as a trade-off, not chosen on test.
Every pipeline is fitted on the split's training events only. A generative model trained on the same split
(`--generative DIR`, e.g. from `bench_sequential.py --split cold-item --save DIR`) adds the union pipeline
scored by it; the cold head's own numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench_cold import configs, metrics, offline  # the same pipelines as the cold-user benchmark

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import cold_item_split, load_dataset
from dragonrec.evaluate.metrics import ndcg_gains
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.rerank import RerankConfig


def paired_change(new: dict, ref: dict, share: float) -> dict:
    """The all-user NDCG@10 of `new` minus `ref` (per-case gains of the same cold and warm cases) with its paired
    standard error: the slices weighed by their shares of the test set, as "all" is."""
    d = {k: new[k] - ref[k] for k in ("cold", "warm")}
    w = {"cold": share, "warm": 1 - share}
    change = sum(w[k] * d[k].mean() for k in d)
    se = float(np.sqrt(sum(w[k] ** 2 * d[k].var(ddof=1) / len(d[k]) for k in d)))
    return {"change": float(change), "se": se, "cases_changed": int(sum((d[k] != 0).sum() for k in d))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--warm", type=int, default=2000, help="warm-target test cases sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--generative", default="", help="a generative model trained on this cold-item split")
    ap.add_argument("--slots", default="1,2,3", help="cold-item slots tried on the union pipelines")
    ap.add_argument("--ranks", default="text", help="which cold candidates take the slots: text,score "
                    "(RerankConfig.cold_item_rank)")
    ap.add_argument("--out", default="benchmarks/results/cold_items_pipelines.json")
    args = ap.parse_args()
    args.slots = [int(k) for k in args.slots.split(",") if k]
    args.ranks = [r for r in args.ranks.split(",") if r]

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
    share = len(cold) / len(split.test)  # the cold targets' share of all test cases: "all" weighs the slices by it
    variants = {}
    dense = DenseConfig(cache_dir=args.cache_dir)
    base = {}
    if generative:
        # the model alone (its own ranking over the whole catalog), and its own top 100 plus dense retrieval's top
        # 50 (the content path that proposes cold items), ranked by the model: what the slots can add to the model
        base["generative model alone"] = PipelineConfig.union({"model": 100}, model="generative",
                                                              model_dir=generative, scorer="model", rest="model",
                                                              dense=dense)
        base["generative + dense candidates"] = PipelineConfig.union(
            {"model": 100, "dense": 50}, model="generative", model_dir=generative, scorer="model", rest="model",
            dense=dense)
    base |= configs(dense, generative)  # after the model alone: every pipeline is compared with it case by case
    for name, cfg in base.items():
        variants[name] = cfg
        if name.startswith(("pipeline", "generative +")):  # with slots for cold items (RerankConfig.cold_item_slots)
            for rank in args.ranks:
                for k in args.slots:
                    by = "" if rank == "text" else f", by {rank}"
                    variants[f"{name}, {k} cold-item slot{'s' if k > 1 else ''}{by}"] = cfg.model_copy(
                        update={"rerank": RerankConfig(cold_item_slots=k, cold_item_rank=rank)})
    results, gains = {}, {}
    for name, cfg in variants.items():
        t1 = time.perf_counter()
        pipe = Pipeline(cfg).fit(split.train, ds.catalog)
        ranks = {k: offline(pipe, c.histories, c.actions, c.targets) for k, c in cases.items()}
        gains[name] = {k: ndcg_gains(r, 10) for k, r in ranks.items()}
        res = {k: metrics(r) for k, r in ranks.items()}
        res["all"] = {m: share * res["cold"][m] + (1 - share) * res["warm"][m] for m in ("hr@10", "ndcg@10")}
        res["cold / warm hr@10"] = res["cold"]["hr@10"] / res["warm"]["hr@10"] if res["warm"]["hr@10"] else None
        base = re.sub(r", \d+ cold-item slots?(, by \w+)?$", "", name)  # the same pipeline without slots
        for ref in dict.fromkeys([base, "generative model alone"]):
            if ref != name and ref in gains:
                res[f"all ndcg@10 change vs {ref}"] = paired_change(gains[name], gains[ref], share)
        results[name] = res
        print(f"{name}: all ndcg {res['all']['ndcg@10']:.4f}; warm hr {res['warm']['hr@10']:.4f} ndcg "
              f"{res['warm']['ndcg@10']:.4f}; cold hr "
              f"{res['cold']['hr@10']:.4f} ndcg {res['cold']['ndcg@10']:.4f} ({time.perf_counter() - t1:.0f}s)",
              flush=True)
    out = {"data": args.data, "split": f"cold-item (5 % of items, seed {args.seed}), history excluded",
           "cold_items": split.info["cold_items"], "cold_cases": len(cold), "warm_cases": len(warm),
           "cold_share_of_test": share,
           "generative": generative, "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
