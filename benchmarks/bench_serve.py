"""Service speed over HTTP on loopback: POST /v1/recommend latency (p50/p90/p99) at 1, 10 and 50 concurrent
clients, and events per second through POST /v1/events, on SQLite and on PostgreSQL, over the Beauty catalog.

    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py \\
        --data ../shared/data/amazon-beauty --model-dir runs/beauty/generative/model --out benchmarks/results/serve.json

A real server per backend (`python -m uvicorn dragonrec.serve.app:app_from_env --factory`, one worker) over
the whole dataset; with `--model-dir` the saved model is registered and active, so a request goes through
the full union pipeline scored by it (dense + co-occurrence + the model's top K + popularity); without one,
the service's fallback pipeline (the same sources minus the model, no scorer) serves, and the results say so.
Each request is a warm user of the dataset (their history is read from the dataset and the store), n=10,
and stores its impression before it answers. Every level is bounded by `--requests` and `--seconds`.
Events: batches of `--batch` events (real user/item pairs, a storefront's action mix) from 10 concurrent
clients, then single-event posts. SQLite is a file (WAL, synchronous=NORMAL); PostgreSQL is a local server
started for the run (fsync on, synchronous_commit on), reached over TCP. The load generator runs on the same
machine as the server (one asyncio process), so on a small machine it takes CPU from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
API_KEY = f"bench-{uuid.uuid4().hex}"
ACTION_MIX = {"view": 0.45, "hover": 0.12, "click": 0.12, "scroll_past": 0.18, "add_to_cart": 0.06,
              "remove_from_cart": 0.02, "purchase": 0.04, "review": 0.01}
DEFAULT_MODEL = ROOT / "runs" / "beauty" / "generative" / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The service in its own process on 127.0.0.1, settings from the environment."""

    def __init__(self, env: dict[str, str], log: Path, args: list[str] = ()):
        self.args = list(args)  # more uvicorn options: ["--workers", "2"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env, self.log = {**os.environ, **env}, log

    def __enter__(self) -> Self:
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "dragonrec.serve.app:app_from_env", "--factory", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--no-access-log", *self.args],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start in 600 s")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def summarize(latencies: list[float], errors: int, wall: float) -> dict:
    ms = np.asarray(latencies) * 1000.0
    if not len(ms):
        return {"requests": 0, "errors": errors}
    return {"requests": len(ms), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(ms) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "mean_ms": round(float(ms.mean()), 1), "max_ms": round(float(ms.max()), 1)}


async def load(url: str, bodies: list[dict], path: str, concurrency: int, max_requests: int, max_seconds: float,
               headers: dict | None = None) -> tuple[list[float], int, float, list[dict]]:
    """`concurrency` clients send `bodies` (cycled) until max_requests or max_seconds; (latencies, errors,
    wall seconds, JSON answers)."""
    latencies: list[float] = []
    answers: list[dict] = []
    errors = 0
    next_k = 0
    t_end = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        async def worker() -> None:
            nonlocal next_k, errors
            while next_k < max_requests and time.perf_counter() < t_end:
                body = bodies[next_k % len(bodies)]
                next_k += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    answers.append(r.json())
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - t0, answers


def event_batches(data: Path, n_batches: int, batch: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    real = pd.read_parquet(data / "interactions.parquet", columns=["user_id", "item_id"])
    n = n_batches * batch
    rows = real.iloc[rng.choice(len(real), size=n, replace=len(real) < n)]
    actions = rng.choice(list(ACTION_MIX), size=n, p=list(ACTION_MIX.values()))
    events = [{"event_id": uuid.uuid4().hex, "user_id": u, "item_id": i, "action": str(a)}
              for u, i, a in zip(rows["user_id"], rows["item_id"], actions)]
    return [{"events": events[k:k + batch]} for k in range(0, n, batch)]


def run_backend(backend: str, args, model_dir: Path | None, work: Path) -> dict:
    from dragonrec.registry import Registry
    from dragonrec.store.pgtemp import TempPostgres

    state = work / backend
    env = {"DRAGONREC_DATA_DIR": str(args.data.resolve()), "DRAGONREC_STATE_DIR": str(state),
           "DRAGONREC_REGISTRY_DIR": str(state / "registry"), "DRAGONREC_API_KEY": API_KEY,
           "DRAGONREC_MAX_EVENTS_PER_BATCH": str(max(args.batch, 1000)),
           "DRAGONREC_EMBEDDING_CACHE_DIR": str(ROOT / ".cache" / "embeddings"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if model_dir is not None:
        Registry(state / "registry").register(model_dir, method="sft", activate=True, note="bench_serve")
    pg = None
    if backend == "postgresql":
        pg = TempPostgres(fsync=True)
        env["DRAGONREC_STORE_URL"] = pg.start()
    try:
        with Server(env, work / f"{backend}.log") as server:
            health = httpx.get(server.url + "/health").json()
            print(f"[{backend}] up in {server.startup_s:.1f}s serving {health['model_version']}", flush=True)
            ds_users = pd.read_parquet(args.data / "interactions.parquet", columns=["user_id"])["user_id"].unique()
            rng = np.random.default_rng(args.seed)
            users = rng.choice(ds_users, size=min(len(ds_users), 5000), replace=False)
            bodies = [{"user_id": str(u), "n": 10, "surface": "bench"} for u in users]
            asyncio.run(load(server.url, bodies[:args.warmup], "/v1/recommend", 1, args.warmup, 120))
            out: dict = {"startup_s": round(server.startup_s, 1), "model_version": health["model_version"],
                         "recommend": {}}
            offset = args.warmup
            for c in args.concurrency:
                lat, err, wall, answers = asyncio.run(load(server.url, bodies[offset:], "/v1/recommend", c,
                                                           args.requests, args.seconds))
                offset += len(lat) + err
                out["recommend"][str(c)] = {**summarize(lat, err, wall),
                                            "cold_share": round(float(np.mean([a["cold"] for a in answers])), 3)
                                            if answers else None}
                print(f"[{backend}] recommend c={c}: {out['recommend'][str(c)]}", flush=True)
            batches = event_batches(args.data, args.event_batches, args.batch, args.seed)
            lat, err, wall, answers = asyncio.run(load(server.url, batches, "/v1/events", 10, len(batches),
                                                       args.seconds, {"X-API-Key": API_KEY}))
            accepted = sum(a["accepted"] for a in answers)
            out["events_batched"] = {"batch": args.batch, "concurrency": 10, "events_accepted": accepted,
                                     "events_per_s": round(accepted / wall, 1), **summarize(lat, err, wall)}
            print(f"[{backend}] events batched: {out['events_batched']}", flush=True)
            singles = event_batches(args.data, args.requests, 1, args.seed + 1)
            lat, err, wall, answers = asyncio.run(load(server.url, singles, "/v1/events", 10, len(singles),
                                                       args.seconds, {"X-API-Key": API_KEY}))
            accepted = sum(a["accepted"] for a in answers)
            out["events_single"] = {"batch": 1, "concurrency": 10, "events_accepted": accepted,
                                    "events_per_s": round(accepted / wall, 1), **summarize(lat, err, wall)}
            print(f"[{backend}] events single: {out['events_single']}", flush=True)
            return out
    finally:
        if pg is not None:
            pg.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "amazon-beauty")
    p.add_argument("--model-dir", type=Path, default=None,
                   help=f"a saved model to serve (default: {DEFAULT_MODEL.relative_to(ROOT)} when it exists)")
    p.add_argument("--no-model", action="store_true", help="serve the fallback pipeline even if a model exists")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--concurrency", default="1,10,50")
    p.add_argument("--requests", type=int, default=300, help="recommend requests per concurrency level (bound)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per level (bound)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--event-batches", type=int, default=50)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    model_dir = args.model_dir
    if model_dir is None and not args.no_model and (DEFAULT_MODEL / "recommender.json").exists():
        model_dir = DEFAULT_MODEL
    if args.no_model:
        model_dir = None
    if model_dir is not None and not (model_dir / "recommender.json").exists():
        raise SystemExit(f"{model_dir} is not a saved dragonrec model (no recommender.json)")
    model = json.loads((model_dir / "recommender.json").read_text())["name"] if model_dir else None
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": os.getloadavg()},
        "data": str(args.data), "model_dir": str(model_dir) if model_dir else None, "model": model,
        "pipeline": (f"union of dense, cooccurrence, model ({model}) and popularity, scored by {model}" if model else
                     "no trained model: the fallback pipeline (dense + cooccurrence + popularity, fused order)"),
        "bounds": {"requests_per_level": args.requests, "seconds_per_level": args.seconds},
        "backends": {},
    }
    work = Path(tempfile.mkdtemp(prefix="dragonrec-bench-serve-"))
    try:
        for backend in args.backends.split(","):
            report["backends"][backend] = run_backend(backend, args, model_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
