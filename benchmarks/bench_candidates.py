"""Candidate recall per source and for their union on leave-one-out test cases (history excluded); optionally
the full-ranking metrics of pipeline configurations built from the same fitted parts.

    flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_candidates.py \
        --data ../shared/data/amazon-beauty --out benchmarks/results/candidates_beauty.json --evaluate

Sources: dense (the RAG query with the demo settings of evaluate/experiment.py DEMO_RECOMMENDERS["rag"]),
co-occurrence (default settings), popularity, and the generative model's own top K when a trained model is at
--model (loaded, never trained here). Embeddings are cached under --cache-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.candidates.query import QueryConfig
from dragonrec.candidates.sources import DenseConfig, DenseSource, ModelSource, PopularitySource
from dragonrec.data import leave_one_out, load_dataset, same_day_mask, shuffle_ties
from dragonrec.data.provenance import check_held_out
from dragonrec.evaluate import evaluate_cases
from dragonrec.evaluate.candidates import candidate_recall
from dragonrec.evaluate.experiment import DEMO_RECOMMENDERS
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.recommenders.cooccurrence import CooccurrenceRecommender
from dragonrec.scorers.model import ModelScorer


def brief(result: dict) -> dict:
    m = result["metrics"]
    out = {k: round(m[k], 5) for k in ("ndcg@10", "hr@10", "ndcg@5", "hr@5", "hr@20", "mrr")} | {"cases": m["cases"]}
    if "same_day" in result.get("slices", {}):
        out["same_day_ndcg@10"] = round(result["slices"]["same_day"]["ndcg@10"], 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--model", default="runs/gen/model", help="a saved generative model (skipped if absent)")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--ks", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--quotas", default=None, help='JSON quotas of the union, default {"dense": 100, '
                    '"cooccurrence": 100, "model": 100, "popularity": 50} (model only with a model)')
    ap.add_argument("--limit", type=int, default=0, help="first N test cases only (0 = all)")
    ap.add_argument("--evaluate", action="store_true", help="also rank the whole catalog with pipeline configs")
    ap.add_argument("--ties", choices=("keep", "shuffle"), default="keep", help="same-timestamp order (as evaluate)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled ties")
    ap.add_argument("--out", default="benchmarks/results/candidates_beauty.json")
    args = ap.parse_args()
    report: dict = {"data": args.data, "command": " ".join(["benchmarks/bench_candidates.py", *sys.argv[1:]]),
                    "args": vars(args)}
    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    events = shuffle_ties(ds.events, args.seed) if args.ties == "shuffle" else ds.events
    split = leave_one_out(events)
    cases = split.test if not args.limit else split.test.subset(np.arange(min(args.limit, len(split.test))))
    demo = DEMO_RECOMMENDERS["rag"]
    dense_cfg = DenseConfig(query=QueryConfig(**demo["query"]), cache_dir=args.cache_dir)
    sources = {"dense": DenseSource(dense_cfg)}
    t = time.perf_counter()
    cooc = CooccurrenceRecommender().fit(split.train, ds.catalog)
    sources["cooccurrence"] = ModelSource(cooc, name="cooccurrence")
    gen = None
    if Path(args.model, "recommender.json").exists():
        from dragonrec.recommenders.sequential import GenerativeRecommender

        check_held_out(args.model, split, ds.catalog.item_ids)  # never a model that saw these test targets
        gen = GenerativeRecommender.load(Path(args.model), ds.catalog)
        sources["model"] = ModelSource(gen, name="model")
    sources["popularity"] = PopularitySource()
    for s in sources.values():
        s.fit(split.train, ds.catalog)
    report["fit_s"] = round(time.perf_counter() - t, 1)
    report["generative_model"] = str(args.model) if gen is not None else None
    quotas = json.loads(args.quotas) if args.quotas else {"dense": 100, "cooccurrence": 100, "model": 100,
                                                          "popularity": 50}
    quotas = {s: q for s, q in quotas.items() if s in sources}
    t = time.perf_counter()
    report["recall"] = candidate_recall(sources, cases, ks=args.ks, quotas=quotas)
    report["recall_s"] = round(time.perf_counter() - t, 1)
    report["settings"] = {"dense_query": demo["query"], "quotas": quotas, "split": "leave-one-out test",
                          "history_excluded": True}
    print_recall(report["recall"], args.ks)

    if args.evaluate:
        report["pipelines"] = {}
        configs = {
            # RAG's demo configuration as a pipeline: dense top 500, co-occurrence scorer, similarity below
            "rag (dense 500, co-occurrence scorer)": (PipelineConfig.rag(k=demo["k"], dense=dense_cfg,
                                                                          scorer="none"), ModelScorer(cooc)),
            "union, fused order (no scorer)": (PipelineConfig.union(quotas, scorer="none", rest="cooccurrence",
                                                                    dense=dense_cfg), None),
            "union, co-occurrence scorer": (PipelineConfig.union(quotas, scorer="none", rest="cooccurrence",
                                                                 dense=dense_cfg), ModelScorer(cooc)),
        }
        if gen is not None:
            configs["union, generative scorer"] = (PipelineConfig.union(quotas, scorer="none", rest="model",
                                                                        dense=dense_cfg), ModelScorer(gen))
        for label, (cfg, scorer) in configs.items():
            t = time.perf_counter()
            pipe = Pipeline(cfg, model=gen, scorer=scorer,
                            sources={k: v for k, v in sources.items() if k in cfg.sources})
            pipe.fit(split.train, ds.catalog)
            res = evaluate_cases(pipe, cases, train=split.train, slices={"same_day": same_day_mask(cases)})
            report["pipelines"][label] = {"test": brief(res), "stats": pipe.stats(),
                                          "seconds": round(time.perf_counter() - t, 1)}
            print(f"{label:45s} NDCG@10 {res['metrics']['ndcg@10']:.4f}  HR@10 {res['metrics']['hr@10']:.4f}  "
                  f"({report['pipelines'][label]['seconds']} s)", flush=True)
        if gen is not None:
            report["pipelines"]["generative alone"] = {"test": brief(evaluate_cases(
                gen, cases, train=split.train, slices={"same_day": same_day_mask(cases)}))}
    report["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['total_s']} s)")


def print_recall(rec: dict, ks) -> None:
    head = "| source | " + " | ".join(f"recall@{k}" for k in ks) + " |"
    print(head + "\n|" + "---|" * (len(ks) + 1))
    for name, r in rec["sources"].items():
        print(f"| {name} | " + " | ".join(f"{r[f'recall@{k}']:.4f}" for k in ks) + " |")
    u = rec["union"]
    print("| union (quotas scaled to K) | " + " | ".join(f"{u[f'recall@{k}']:.4f} ({u[f'size@{k}']:.0f} items)"
                                                       for k in ks) + " |")
    c = rec["union_configured"]
    print(f"union at the configured quotas {c['quotas']} (total {c['total']}, {c['size']:.0f} distinct items): "
          f"recall {c['recall']:.4f}  ({rec['cases']} cases)")


if __name__ == "__main__":
    main()
