"""What one shared pipeline pass costs per request as more concurrent requests share it (the served Beauty
generative model, the service's pipeline, fresh users for every batch size so no score cache helps).

    env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pipeline_batch.py [--model-dir DIR] [--rows 240]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

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
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="dragonrec-bench-batch-")) / "state"
    Registry(state / "registry").register(args.model_dir, method="sft", activate=True, note="bench_pipeline_batch")
    settings = Settings(data_dir=args.data, state_dir=state, embedding_cache_dir=str(ROOT / ".cache" / "embeddings"))
    out = {"model_dir": str(args.model_dir), "rows_per_size": args.rows, "ms_per_request": {}}
    with Service(settings) as service:
        pipe = service.serving.pipeline
        users = np.random.default_rng(0).choice(service.events["user_id"].unique(), args.rows * len(SIZES) + 50,
                                                replace=False)
        rows = []
        for u in users:
            h, a, _ = service._history_for(str(u), service.serving.state.catalog, time.time())
            a = np.asarray([str(x) for x in a], dtype=object)
            rows.append((h, a, np.unique(h), None, RerankRequest(h, a, None, None, 10)))
        for r in rows[-50:]:  # warm-up on users not measured
            pipe.rank_rows([r])
        for k, size in enumerate(SIZES):
            part = rows[k * args.rows:(k + 1) * args.rows]
            t = time.perf_counter()
            for start in range(0, len(part), size):
                pipe.rank_rows(part[start:start + size])
            out["ms_per_request"][size] = round(1000 * (time.perf_counter() - t) / len(part), 2)
            print(f"batch {size:2d}: {out['ms_per_request'][size]:.2f} ms per request", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
