"""The RAG baseline's candidates re-ordered by a local LLM scorer vs left in retrieval order, on the same users.

    .venv/bin/python benchmarks/bench_llm_scorer.py --data ../shared/data/amazon-beauty --users 200 --seed 0 \
        --k 20 --model smollm2 --mode loglik --out runs/bench_llm_scorer/loglik.json

Leave-one-out split of the dataset; N test users drawn at random with the seed (the full Beauty test set is
22,363 users, far too many for a CPU LLM). One RAG pipeline (MiniLM + FAISS, top K by the user's weighted
history, `--set`-equivalent settings below) ranks the whole catalog twice per user: its K candidates in
retrieval order, then in the order `HFLocalScorer` gives them (everything below the K candidates in retrieval
order in both). Reports HR@10/NDCG@10 (and @5/@20, MRR; history excluded) of both on the same users, the
scorer's latency per request and tokens, and degraded requests with their reasons. With `--max-minutes` it
stops after the chunk that passes the budget and reports the users done so far (both orders on those users).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate.metrics import target_ranks
from dragonrec.evaluate.runner import ranking_metrics
from dragonrec.rag import RAGConfig, RAGPipeline
from dragonrec.scorers.base import Scorer, ScoreRequest, ScoreResult
from dragonrec.scorers.hf_local import HFLocalScorer, HFScorerConfig


class Recording(Scorer):
    """Passes requests to a scorer and keeps every result's usage and degradation."""

    def __init__(self, inner: Scorer):
        self.inner, self.name = inner, inner.name
        self.results: list[ScoreResult] = []

    def score(self, request: ScoreRequest) -> ScoreResult:
        res = self.inner.score(request)
        self.results.append(res)
        return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/amazon-beauty")
    p.add_argument("--users", type=int, default=200, help="test users sampled with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=20, help="candidates the LLM re-orders")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a local HF model directory")
    p.add_argument("--mode", default="loglik", choices=["loglik", "choose"])
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads for the LLM")
    p.add_argument("--cache-dir", default=".cache/embeddings", help="MiniLM embedding cache")
    p.add_argument("--chunk", type=int, default=10, help="users per scoring call (progress granularity)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the chunk that passes this")
    p.add_argument("--out", default=None, help="write the JSON report here")
    a = p.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset(a.data)
    split = leave_one_out(ds.events)
    rng = np.random.default_rng(a.seed)
    pick = np.sort(rng.choice(len(split.test), min(a.users, len(split.test)), replace=False))
    cases = split.test.subset(pick)
    rag = RAGPipeline(RAGConfig(k=a.k, scorer="none", cache_dir=a.cache_dir)).fit(split.train, ds.catalog)
    scorer = Recording(HFLocalScorer(HFScorerConfig(model_dir=a.model, mode=a.mode, num_threads=a.num_threads)))
    setup_s = time.perf_counter() - t0
    print(f"{ds.name}: {len(cases)} of {len(split.test)} test users (seed {a.seed}), k={a.k}, "
          f"scorer {scorer.name} ({a.mode}); setup {setup_s:.0f}s", file=sys.stderr, flush=True)

    ranks = {"retrieval": [], "llm": []}
    t_llm = 0.0
    done = 0
    t_start = time.perf_counter()
    for s in range(0, len(cases), a.chunk):
        hist, acts, tgt = cases.histories[s:s + a.chunk], cases.actions[s:s + a.chunk], cases.targets[s:s + a.chunk]
        rag.scorer = None
        ranks["retrieval"].append(target_ranks(rag.score(hist, acts), tgt, exclude=hist))
        rag.scorer = scorer
        t1 = time.perf_counter()
        ranks["llm"].append(target_ranks(rag.score(hist, acts), tgt, exclude=hist))
        t_llm += time.perf_counter() - t1
        done += len(hist)
        elapsed = time.perf_counter() - t_start
        hr = {k: float(np.mean(np.concatenate(v) < 10)) for k, v in ranks.items()}
        print(f"{done}/{len(cases)} users, {elapsed:.0f}s; hr@10 retrieval {hr['retrieval']:.4f} "
              f"llm {hr['llm']:.4f}", file=sys.stderr, flush=True)
        if a.max_minutes is not None and elapsed > 60 * a.max_minutes:
            break

    results = scorer.results
    lat = np.asarray([r.usage.latency_s for r in results])
    report = {
        "dataset": ds.name, "split": "leave-one-out", "test_users_total": len(split.test), "users": done,
        "users_sampled": len(cases), "seed": a.seed, "k": a.k, "scorer": scorer.name, "mode": a.mode,
        "num_threads": a.num_threads,
        "retrieval_order": ranking_metrics(np.concatenate(ranks["retrieval"])),
        "llm_order": ranking_metrics(np.concatenate(ranks["llm"])),
        "candidate_recall@k": float(np.mean(np.concatenate(ranks["retrieval"]) < a.k)),
        "requests": len(results),
        "degraded": int(sum(r.degraded for r in results)),
        "degraded_reasons": sorted({(r.degraded_reason or "")[:160] for r in results if r.degraded})[:10],
        "latency_s": {"mean": float(lat.mean()) if len(lat) else None,
                      "p50": float(np.median(lat)) if len(lat) else None,
                      "p95": float(np.quantile(lat, 0.95)) if len(lat) else None},
        "tokens_per_request": {
            "prompt": float(np.mean([r.usage.prompt_tokens for r in results])) if results else None,
            "completion": float(np.mean([r.usage.completion_tokens for r in results])) if results else None},
        "seconds": {"setup": setup_s, "llm_scoring": t_llm, "total": time.perf_counter() - t0},
        "command": " ".join(sys.argv),
    }
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
