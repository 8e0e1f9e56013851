"""Index build and query speed: the Beauty catalog (real MiniLM embeddings) and a synthetic catalog of random
384-d unit vectors (1,000,000 by default), for flat, IVF and HNSW.

    flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_index.py --out benchmarks/results/index.json

Per index: build seconds, RSS growth and serialised size, p50/p99 single-query latency (top-10), recall@10
against the exact flat answer, and for the synthetic catalog the time to add and remove 1,000 items.
Random vectors have no cluster structure, the worst case for approximate indexes: their recall there is a
floor, not what real embeddings get (see the Beauty rows).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.embed import normalize
from dragonrec.index import IndexConfig, VectorIndex


def rss() -> int:
    return psutil.Process().memory_info().rss


def latency(index: VectorIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query milliseconds and top-10 labels, one query at a time (as a request would)."""
    lat = []
    found = np.zeros((len(queries), 10), dtype=np.int64)
    for i, q in enumerate(queries):
        t = time.perf_counter()
        found[i] = index.search(q[None], 10).labels[0]
        lat.append(time.perf_counter() - t)
    return np.asarray(lat) * 1000, found


def stats(lat_ms: np.ndarray, found: np.ndarray, truth: np.ndarray | None) -> dict:
    row = {"p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
           "queries": len(lat_ms)}
    if truth is not None:
        row["recall@10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])), 4)
    return row


def measure(name: str, vectors: np.ndarray, ids: list[str], cfg: IndexConfig, queries: np.ndarray,
            truth: np.ndarray | None, update: bool = False, variants: dict | None = None) -> tuple[dict, np.ndarray]:
    r0 = rss()
    t = time.perf_counter()
    index = VectorIndex.build(vectors, ids, model="bench", cfg=cfg)
    build_s = time.perf_counter() - t
    grown = rss() - r0
    lat_ms, found = latency(index, queries)
    row = {"index": name, "n": len(vectors), "kind": index.kind, "build_s": round(build_s, 2),
           "rss_delta_mb": round(grown / 2**20, 1), "size_mb": round(index.nbytes() / 2**20, 1),
           **stats(lat_ms, found, truth)}
    # the same index searched with other settings (e.g. nprobe): no rebuild
    for label, update_cfg in (variants or {}).items():
        base_cfg = index.cfg
        index.cfg = base_cfg.model_copy(update=update_cfg)
        row[label] = stats(*latency(index, queries), truth)
        index.cfg = base_cfg
    if update:
        rng = np.random.default_rng(1)
        new = normalize(rng.normal(size=(1000, vectors.shape[1])).astype(np.float32))
        t = time.perf_counter()
        index.add(new, [f"new{i}" for i in range(1000)])
        row["add_1000_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        index.remove([f"new{i}" for i in range(1000)])
        row["remove_1000_s"] = round(time.perf_counter() - t, 3)
    print(row, flush=True)
    del index
    return row, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/amazon-beauty")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic catalog size")
    ap.add_argument("--hnsw-n", type=int, default=1_000_000, help="synthetic size for HNSW (0 = skip)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/index.json")
    args = ap.parse_args()
    import faiss

    rows = []
    report = {"command": "benchmarks/bench_index.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(), "rows": rows}

    # Beauty: real item embeddings; queries = 1,000 items' own vectors
    from dragonrec.data import load_dataset
    from dragonrec.embed import embed_catalog

    cat = load_dataset(args.data).catalog
    vec = embed_catalog(cat, cache_dir=args.cache_dir)
    ids = cat.item_ids.tolist()
    q = vec[np.random.default_rng(0).choice(len(vec), 1000, replace=False)]
    omp_default = {"omp_default_threads": {"small_batch_threads": 0}}
    flat, truth = measure("beauty/flat", vec, ids, IndexConfig(kind="flat"), q, None, variants=omp_default)
    flat["recall@10"] = 1.0
    rows.append(flat)
    rows.append(measure("beauty/ivf", vec, ids, IndexConfig(kind="ivf"), q, truth,
                        variants={"nprobe4": {"nprobe": 4}, "nprobe64": {"nprobe": 64}})[0])
    rows.append(measure("beauty/hnsw", vec, ids, IndexConfig(kind="hnsw"), q, truth,
                        variants={"ef_search16": {"ef_search": 16}, **omp_default})[0])

    # synthetic: n random unit vectors
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    syn = normalize(rng.standard_normal((args.n, 384), dtype=np.float32))
    report["synthetic_generate_s"] = round(time.perf_counter() - t, 1)
    sids = [str(i) for i in range(args.n)]
    sq = normalize(rng.standard_normal((args.queries, 384), dtype=np.float32))
    flat, truth = measure("synthetic/flat", syn, sids, IndexConfig(kind="flat"), sq, None, update=True)
    flat["recall@10"] = 1.0
    rows.append(flat)
    rows.append(measure("synthetic/ivf", syn, sids, IndexConfig(kind="ivf"), sq, truth, update=True,
                        variants={"nprobe64": {"nprobe": 64}, "nprobe256": {"nprobe": 256}})[0])
    if args.hnsw_n:
        m = min(args.hnsw_n, args.n)
        sub_truth = truth if m == args.n else None
        rows.append(measure("synthetic/hnsw", syn[:m], sids[:m], IndexConfig(kind="hnsw", hnsw_m=16), sq, sub_truth,
                            variants={"ef_search256": {"ef_search": 256}})[0])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
