"""Index build and query speed: the Beauty catalog (real MiniLM embeddings) and a synthetic catalog of random
384-d unit vectors (1,000,000 by default), for flat, IVF and HNSW.

    flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_index.py --out benchmarks/results/index.json
    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_index.py \
        --skip-beauty --synthetic random,clustered --out benchmarks/results/index_1m.json

Per index: build seconds, RSS growth and serialised size, p50/p99 single-query latency (top-100), recall@10
and recall@100 against the exact flat answer, the same for other search settings (IVF nprobe, HNSW
efSearch) without a rebuild, and for the synthetic catalog the time to add and remove 1,000 items. The
`auto` row is what `IndexConfig()` (the default every dense source uses) builds for that catalog size.
Random vectors have no cluster structure, the worst case for approximate indexes: their recall there is a
floor. `clustered` vectors (unit vectors scattered around 2,000 random centres, queries drawn the same way)
are closer to real text embeddings, which cluster by topic (see also the Beauty rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


K = 100  # a dense source asks for its quota (100 by default) per request


def latency(index: VectorIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query milliseconds and top-K labels, one query at a time (as a request would)."""
    lat = []
    found = np.full((len(queries), K), -1, dtype=np.int64)
    for i, q in enumerate(queries):
        t = time.perf_counter()
        labels = index.search(q[None], K).labels[0]
        lat.append(time.perf_counter() - t)
        found[i, :len(labels)] = labels
    return np.asarray(lat) * 1000, found


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return round(float(np.mean([len(set(a[:k]) & set(b[:k]) - {-1}) / k for a, b in zip(found, truth)])), 4)


def stats(lat_ms: np.ndarray, found: np.ndarray, truth: np.ndarray | None) -> dict:
    row = {"p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
           "queries": len(lat_ms)}
    if truth is not None:
        row["recall@10"] = recall(found, truth, 10)
        row["recall@100"] = recall(found, truth, 100)
    return row


def synthetic_vectors(kind: str, n: int, n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n catalog vectors and n_queries queries, 384-d unit rows: `random` (uniform on the sphere) or
    `clustered` (around 2,000 random centres; cosine to the centre about 0.7)."""
    if kind == "random":
        return (normalize(rng.standard_normal((n, 384), dtype=np.float32)),
                normalize(rng.standard_normal((n_queries, 384), dtype=np.float32)))
    if kind != "clustered":
        raise ValueError(f"unknown synthetic kind {kind!r}: random or clustered")
    centres = normalize(rng.standard_normal((2000, 384), dtype=np.float32))

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, 384), dtype=np.float32)
        for s in range(0, m, 100_000):  # in slices: one [n, 384] noise array at a time is enough
            k = min(100_000, m - s)
            out[s:s + k] = centres[rng.integers(0, 2000, k)] + 0.05 * rng.standard_normal((k, 384), dtype=np.float32)
        return normalize(out)

    return draw(n), draw(n_queries)


def measure(name: str, vectors: np.ndarray, ids: list[str], cfg: IndexConfig, queries: np.ndarray,
            truth: np.ndarray | None, update: bool = False, variants: dict | None = None) -> tuple[dict, np.ndarray]:
    r0 = rss()
    t = time.perf_counter()
    index = VectorIndex.build(vectors, ids, model="bench", cfg=cfg)
    build_s = time.perf_counter() - t
    grown = rss() - r0
    lat_ms, found = latency(index, queries)
    row = {"index": name, "n": len(vectors), "kind": index.kind, "build_s": round(build_s, 2),
           "params": {"nlist": getattr(index.index, "nlist", None), "nprobe": cfg.nprobe} if index.kind == "ivf"
           else {"M": cfg.hnsw_m, "efConstruction": cfg.ef_construction, "efSearch": cfg.ef_search}
           if index.kind == "hnsw" else {},
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
    ap.add_argument("--skip-beauty", action="store_true")
    ap.add_argument("--synthetic", default="random", help="random and/or clustered (comma-separated)")
    ap.add_argument("--hnsw", default="random", help="the synthetic kinds that also get an HNSW index")
    ap.add_argument("--out", default="benchmarks/results/index.json")
    args = ap.parse_args()
    import faiss

    rows = []
    report = {"command": " ".join(["benchmarks/bench_index.py", *sys.argv[1:]]),
              "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads(),
              "top_k": K, "rows": rows, "loadavg_start": os.getloadavg()}

    if not args.skip_beauty:  # Beauty: real item embeddings; queries = 1,000 items' own vectors
        from dragonrec.data import load_dataset
        from dragonrec.embed import embed_catalog

        cat = load_dataset(args.data).catalog
        vec = embed_catalog(cat, cache_dir=args.cache_dir)
        ids = cat.item_ids.tolist()
        q = vec[np.random.default_rng(0).choice(len(vec), 1000, replace=False)]
        omp_default = {"omp_default_threads": {"small_batch_threads": 0}}
        flat, truth = measure("beauty/flat", vec, ids, IndexConfig(kind="flat"), q, None, variants=omp_default)
        flat["recall@10"] = flat["recall@100"] = 1.0
        rows.append(flat)
        rows.append(measure("beauty/ivf", vec, ids, IndexConfig(kind="ivf"), q, truth,
                            variants={"nprobe4": {"nprobe": 4}, "nprobe64": {"nprobe": 64}})[0])
        rows.append(measure("beauty/hnsw", vec, ids, IndexConfig(kind="hnsw"), q, truth,
                            variants={"ef_search16": {"ef_search": 16}, **omp_default})[0])

    report["auto_kind"] = {str(n): IndexConfig().resolve(n) for n in (12_101, 200_000, 200_001, args.n)}
    for kind in [k for k in args.synthetic.split(",") if k]:
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        syn, sq = synthetic_vectors(kind, args.n, args.queries, rng)
        report[f"{kind}_generate_s"] = round(time.perf_counter() - t, 1)
        sids = [str(i) for i in range(args.n)]
        flat, truth = measure(f"{kind}/flat", syn, sids, IndexConfig(kind="flat"), sq, None, update=True)
        flat["recall@10"] = flat["recall@100"] = 1.0
        rows.append(flat)
        # what every dense source builds by default for this size (auto: IVF above 200k items)
        auto, _ = measure(f"{kind}/auto", syn, sids, IndexConfig(), sq, truth, update=True,
                          variants={f"nprobe{p}": {"nprobe": p} for p in (4, 64, 256)})
        rows.append(auto)
        if kind in args.hnsw.split(","):
            rows.append(measure(f"{kind}/hnsw", syn, sids, IndexConfig(kind="hnsw", hnsw_m=16), sq, truth,
                                variants={f"ef_search{e}": {"ef_search": e} for e in (128, 256, 512)})[0])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))  # what is done so far, should a later part fail
        del syn
    report["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
