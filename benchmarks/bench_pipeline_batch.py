"""What one shared pipeline pass costs per request as more concurrent requests share it (the served Beauty
generative model, the service's pipeline, fresh users for every batch size so no score cache helps).

    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pipeline_batch.py [--model-dir DIR] [--rows 240]

`--rounds R` measures every batch size R times over the same rows (the model's row cache cleared before each
round) and reports the minimum and the median: on a machine shared with other work the median of several rounds,
and an A/B of two code versions run in turns (`PYTHONPATH=<worktree>/src` for the other one), say more than one
pass.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import dragonrec
from dragonrec.registry import Registry
from dragonrec.rerank import RerankRequest
from dragonrec.serve import Service, Settings

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "amazon-beauty")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "beauty" / "generative" / "model")
    ap.add_argument("--rows", type=int, default=240, help="requests per batch size")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=1, help="measure each batch size this many times")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="dragonrec-bench-batch-")) / "state"
    Registry(state / "registry").register(args.model_dir, method="sft", activate=True, note="bench_pipeline_batch")
    settings = Settings(data_dir=args.data, state_dir=state, embedding_cache_dir=str(ROOT / ".cache" / "embeddings"))
    sizes = [int(x) for x in args.sizes.split(",") if x]
    out = {"model_dir": str(args.model_dir), "code": str(Path(dragonrec.__file__).parent), "rows_per_size": args.rows,
           "rounds": args.rounds, "ms_per_request": {}, "ms_per_request_rounds": {}}
    with Service(settings) as service:
        pipe = service.serving.pipeline
        users = np.random.default_rng(0).choice(service.events["user_id"].unique(), args.rows * len(sizes) + 50,
                                                replace=False)
        rows = []
        for u in users:
            h, a, _ = service._history_for(str(u), service.serving.state.catalog, time.time())
            a = np.asarray([str(x) for x in a], dtype=object)
            rows.append((h, a, np.unique(h), None, RerankRequest(h, a, None, None, 10)))
        for r in rows[-50:]:  # warm-up on users not measured
            pipe.rank_rows([r])
        cache = getattr(pipe.model, "_cache", None)  # BatchedModel's rows of recent histories
        for k, size in enumerate(sizes):
            part = rows[k * args.rows:(k + 1) * args.rows]
            per = []
            for _ in range(args.rounds):
                if cache is not None:
                    cache.clear()
                t = time.perf_counter()
                for start in range(0, len(part), size):
                    pipe.rank_rows(part[start:start + size])
                per.append(round(1000 * (time.perf_counter() - t) / len(part), 2))
            out["ms_per_request"][size] = float(np.median(per))
            out["ms_per_request_rounds"][size] = per
            print(f"batch {size:2d}: {np.median(per):.2f} ms per request (median of {len(per)}; min {min(per):.2f})",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
