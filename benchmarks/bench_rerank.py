"""The diversity knob's trade-off: accuracy against intra-list diversity and coverage as the re-ranker moves.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank.py --data ../shared/data/amazon-beauty \
        --users 3000 --out benchmarks/results/rerank.json

A co-occurrence pipeline (co-occurrence + popularity candidates, scored by co-occurrence) is fitted once on the
leave-one-out training part; each setting swaps in a DiversityReranker and ranks the whole catalog for a fixed
random sample of test users (history excluded). Item vectors are the dense source's MiniLM text embeddings
(cached under --cache-dir). Nothing is tuned: the settings are fixed in SETTINGS.
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

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import leave_one_out, load_dataset
from dragonrec.embed import embed_catalog
from dragonrec.evaluate.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    ndcg_at_k,
    target_ranks,
)
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.rerank import DiversityReranker, RerankConfig, Reranker, category_key

SETTINGS: dict[str, RerankConfig | None] = {
    "none": None,
    "diversity=0": RerankConfig(diversity=0.0, exclude_bought=False),
    "diversity=0.1": RerankConfig(diversity=0.1, exclude_bought=False),
    "diversity=0.3": RerankConfig(diversity=0.3, exclude_bought=False),
    "diversity=0.5": RerankConfig(diversity=0.5, exclude_bought=False),
    "cap=3": RerankConfig(category_cap=3, exclude_bought=False),
    "cap=3 (depth 2)": RerankConfig(category_cap=3, category_depth=2, exclude_bought=False),
    "diversity=0.3+cap=3": RerankConfig(diversity=0.3, category_cap=3, exclude_bought=False),
    "calibration=0.5": RerankConfig(calibration=0.5, exclude_bought=False),
}


def measure(pipe: Pipeline, cases, vectors: np.ndarray, categories: np.ndarray, n: int = 10) -> dict:
    t0 = time.perf_counter()
    ranks, lists = [], []
    for start in range(0, len(cases), 256):
        hist, acts = cases.histories[start:start + 256], cases.actions[start:start + 256]
        scores = pipe.score(hist, acts)
        ranks.append(target_ranks(scores, cases.targets[start:start + 256], exclude=hist))
        for b, h in enumerate(hist):
            scores[b, h] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        lists += [row.tolist() for row in top]
    r = np.concatenate(ranks)
    top_cats = np.asarray([category_key(c, 2) for c in categories], dtype=object)
    return {
        "ndcg@10": ndcg_at_k(r, 10), "hr@10": hit_rate_at_k(r, 10),
        "ild_category": intra_list_diversity(lists, categories=categories),
        "ild_category_depth2": intra_list_diversity(lists, categories=top_cats),
        "ild_embedding": intra_list_diversity(lists, embeddings=vectors),
        "catalog_coverage": catalog_coverage(lists, len(categories)),
        "category_coverage": len({categories[i] for lst in lists for i in lst if categories[i]})
        / max(len({c for c in categories if c}), 1),
        "cases": len(r), "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--users", type=int, default=3000, help="test users sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--out", default="benchmarks/results/rerank.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    rng = np.random.default_rng(args.seed)
    cases = split.test.subset(np.sort(rng.choice(len(split.test), min(args.users, len(split.test)), replace=False)))
    dense = DenseConfig(cache_dir=args.cache_dir)
    vectors = embed_catalog(ds.catalog, cache_dir=args.cache_dir, template=dense.template)
    cfg = PipelineConfig.union({"cooccurrence": 100, "popularity": 50}, model="cooccurrence", scorer="model",
                               rest="cooccurrence", dense=dense)
    pipe = Pipeline(cfg).fit(split.train, ds.catalog)
    print(f"fitted in {time.perf_counter() - t0:.0f}s; {len(cases)} test users", flush=True)
    categories = ds.catalog.categories
    results = {}
    for name, rc in SETTINGS.items():
        pipe.reranker = Reranker() if rc is None else DiversityReranker(rc).fit(ds.catalog, vectors)
        results[name] = {"config": None if rc is None else rc.model_dump(), **measure(pipe, cases, vectors, categories)}
        m = results[name]
        print(f"{name:22s} ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f} ild_cat {m['ild_category']:.3f} "
              f"ild_emb {m['ild_embedding']:.3f} cov {m['catalog_coverage']:.3f} ({m['seconds']}s)", flush=True)
    base = results["none"]
    for m in results.values():
        m["vs_none"] = {k: (m[k] / base[k] - 1.0) if base[k] else None
                        for k in ("ndcg@10", "hr@10", "ild_category", "ild_embedding", "catalog_coverage")}
    out = {"data": args.data, "split": "loo test, history excluded", "users": len(cases), "seed": args.seed,
           "pipeline": cfg.model_dump(exclude={"rerank"}), "item_vectors": "all-MiniLM-L6-v2, dense template",
           "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
