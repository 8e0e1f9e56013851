"""RAG baseline quality on a dataset: leave-one-out, full ranking, retrieval recall@K, query weights tuned on
validation only, then local scorers (retrieval order alone; own-model scorer over popularity/co-occurrence).

    flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_rag.py \
        --data /work/shared/data/amazon-beauty --out benchmarks/results/rag_beauty.json

Embeddings are cached under .cache/embeddings (the first run embeds 12k Beauty items in about 2 minutes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.candidates import QueryConfig
from dragonrec.data import EvalCases, leave_one_out, load_dataset
from dragonrec.embed import embed_catalog
from dragonrec.evaluate import evaluate_cases, evaluate_split
from dragonrec.rag import RAGConfig, RAGPipeline
from dragonrec.scorers.model import ModelScorer

RECALL_KS = (20, 50, 100, 200)


def retrieval_recall(rag: RAGPipeline, cases: EvalCases, ks=RECALL_KS, batch: int = 2048) -> dict[str, float]:
    """Share of cases whose target is among the top-K retrieved candidates (history excluded)."""
    kmax = max(ks)
    hits = {k: 0 for k in ks}
    for s in range(0, len(cases), batch):
        cand = rag.candidates(cases.histories[s:s + batch], cases.actions[s:s + batch], k=kmax)
        tgt = cases.targets[s:s + batch]
        pos = np.where(cand == tgt[:, None], np.arange(kmax)[None, :], kmax).min(axis=1)
        for k in ks:
            hits[k] += int((pos < k).sum())
    return {f"recall@{k}": hits[k] / max(len(cases), 1) for k in ks}


def prompt_size(rag: RAGPipeline, cases: EvalCases, k: int = 20, n_cases: int = 500) -> dict:
    """Measured size of the LLM scorer's prompt for K candidates (characters; tokens only as chars / 4)."""
    from dragonrec.scorers.openai_compat import LLMSettings, build_messages

    settings = LLMSettings()
    chars = []
    for b in range(min(n_cases, len(cases))):
        items = rag.candidates([cases.histories[b]], [cases.actions[b]], k=k)[0]
        items = items[items >= 0]
        req = rag._request(cases.histories[b], cases.actions[b], items, np.zeros(len(items), np.float32), None)
        chars.append(sum(len(m["content"]) for m in build_messages(req, settings)))
    mean = float(np.mean(chars))
    est_tokens = mean / 4
    return {"k": k, "cases": len(chars), "mean_prompt_chars": round(mean), "p95_prompt_chars": int(np.percentile(chars, 95)),
            "est_prompt_tokens_chars_div_4": round(est_tokens),
            "est_prompt_cost_usd_per_1k_requests_at_0.0005_per_1k_tokens": round(est_tokens * 0.0005, 3)}


def brief(result: dict) -> dict:
    m = result["metrics"]
    return {k: round(m[k], 5) for k in ("ndcg@10", "hr@10", "ndcg@5", "hr@5", "hr@20", "mrr")} | {"cases": m["cases"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/amazon-beauty")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--out", default="benchmarks/results/rag_beauty.json")
    ap.add_argument("--tune-cases", type=int, default=0, help="validation cases for the grid (0 = all)")
    args = ap.parse_args()
    report: dict = {"data": args.data, "command": "benchmarks/bench_rag.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    t = time.perf_counter()
    vectors = embed_catalog(ds.catalog, cache_dir=args.cache_dir)
    report["embed_s"] = round(time.perf_counter() - t, 2)
    print(f"{ds.name}: {len(ds.catalog)} items, {len(split.valid)} valid / {len(split.test)} test cases; "
          f"embeddings {report['embed_s']} s")

    # 1. query weights on VALIDATION only. Beauty has one action (review), so recency and window matter.
    tune = split.valid if not args.tune_cases else split.valid.subset(np.arange(min(args.tune_cases, len(split.valid))))
    grid = []
    for half_life, max_history in itertools.product([0.5, 1.0, 2.0, 4.0, None], [5, 50]):
        if half_life is not None and half_life <= 1.0 and max_history == 50:
            continue  # 0.5**(5/half_life) <= 3 %: the window no longer matters
        q = QueryConfig(half_life=half_life, max_history=max_history)
        rag = RAGPipeline(RAGConfig(query=q)).fit(split.train, ds.catalog, item_vectors=vectors)
        r = evaluate_cases(rag, tune)
        row = {"half_life": half_life, "max_history": max_history, **brief(r),
               **retrieval_recall(rag, tune, ks=(50,))}
        grid.append(row)
        print("tune", row)
    best = max(grid, key=lambda r: r["ndcg@10"])
    query = QueryConfig(half_life=best["half_life"], max_history=best["max_history"])
    report["tuning"] = {"grid": grid, "chosen": {"half_life": best["half_life"], "max_history": best["max_history"]},
                        "criterion": "valid ndcg@10 (retrieval order alone)"}

    # 2. retrieval recall@K: the ceiling of any scorer that re-ranks K candidates
    rag = RAGPipeline(RAGConfig(query=query)).fit(split.train, ds.catalog, item_vectors=vectors)
    report["retrieval_recall"] = {"valid": retrieval_recall(rag, split.valid), "test": retrieval_recall(rag, split.test)}
    print("recall", report["retrieval_recall"])
    report["llm_prompt_size"] = prompt_size(rag, split.valid)
    print("prompt", report["llm_prompt_size"])

    # 3. full-ranking metrics: retrieval alone, then own-model scorers over the K candidates
    from dragonrec.recommenders.cooccurrence import CooccurrenceRecommender
    from dragonrec.recommenders.popularity import PopularityRecommender

    runs = {}
    t = time.perf_counter()
    res = evaluate_split(rag, split)
    runs["rag_retrieval_only"] = {"k": rag.rag_cfg.k, "valid": brief(res["valid"]), "test": brief(res["test"]),
                                  "test_cold_user": brief({"metrics": res["test"]["slices"]["cold_user"]}),
                                  "beyond": res["test"]["beyond"], "seconds": round(time.perf_counter() - t, 1)}
    print("rag_retrieval_only", runs["rag_retrieval_only"])
    bases = {"popularity": PopularityRecommender().fit(split.train, ds.catalog),
             "cooccurrence": CooccurrenceRecommender().fit(split.train, ds.catalog)}
    for name, base in bases.items():
        t = time.perf_counter()
        res = evaluate_split(base, split)
        runs[f"{name}_alone"] = {"valid": brief(res["valid"]), "test": brief(res["test"]),
                                 "seconds": round(time.perf_counter() - t, 1)}
        print(f"{name}_alone", runs[f"{name}_alone"])
        # K for the scorer chosen on validation
        by_k = {}
        for k in (20, 50, 100, 200, 500):
            r = RAGPipeline(RAGConfig(k=k, query=query), scorer=ModelScorer(base)).fit(
                split.train, ds.catalog, item_vectors=vectors)
            by_k[k] = brief(evaluate_cases(r, tune))
            print(f"rag+{name} k={k} valid", by_k[k])
        k_best = max(by_k, key=lambda k: by_k[k]["ndcg@10"])
        r = RAGPipeline(RAGConfig(k=k_best, query=query), scorer=ModelScorer(base)).fit(
            split.train, ds.catalog, item_vectors=vectors)
        t = time.perf_counter()
        res = evaluate_split(r, split)
        runs[f"rag+{name}_scorer"] = {"k": k_best, "valid_by_k": by_k, "valid": brief(res["valid"]),
                                      "test": brief(res["test"]),
                                      "test_cold_user": brief({"metrics": res["test"]["slices"]["cold_user"]}),
                                      "seconds": round(time.perf_counter() - t, 1)}
        print(f"rag+{name}_scorer", runs[f"rag+{name}_scorer"])
    report["runs"] = runs
    report["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['total_s']} s")


if __name__ == "__main__":
    main()
