"""Open-loop load on the service over loopback (PostgreSQL store): recommend at fixed arrival rates and at
rising concurrency, events at fixed rates, on the Beauty catalog or a synthetic 1,000,000-item catalog.

    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_load.py \\
        --catalog beauty --out benchmarks/results/load_beauty.json
    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_load.py \\
        --catalog synthetic --items 1000000 --out benchmarks/results/load_synthetic_1m.json
    .venv/bin/python benchmarks/bench_load.py --profile 200 --catalog beauty    # in-process: where a request goes

Open loop: requests are sent at Poisson arrival times fixed in advance (rate r per second), whether or not
earlier ones have answered, and each latency runs from the request's scheduled time to its answer, so a
server that falls behind shows it as queueing (no coordinated omission). Every level is bounded by
`--requests` and `--seconds`; more than `--max-in-flight` unanswered requests count as dropped (errors).
Closed loop: c clients each send their next request when the last one answered. Events: batches of `--batch`
events at fixed event rates, and single events.

A real server (`python -m uvicorn dragonrec.serve.app:app_from_env --factory`, `--workers` processes, uvloop
and the httptools parser) over a local PostgreSQL (fsync on, synchronous_commit on). The
load generator is a minimal asyncio HTTP/1.1 client in this process, on the same cores as the server: its
CPU seconds, the server's and the load average are recorded for every level.

The synthetic catalog: `--items` products with generated titles, a popularity-skewed event log, random unit
vectors as their text embeddings (written into an embedding cache of their own: MiniLM cannot embed a
million texts on this CPU in reasonable time) and an untrained sasrec-shaped model over every item (the
width and depth of the Beauty model when it exists), so latency is real and the lists are meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import ACTION_MIX, API_KEY, Server  # the server start-up is shared

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "amazon-beauty"
BEAUTY_MODEL = ROOT / "runs" / "beauty" / "generative" / "model"


# -- a minimal HTTP/1.1 client (keep-alive connections, one request at a time each) --------------------------
IDLE_S = 3.0  # uvicorn closes a keep-alive connection idle for 5 s: reuse only younger ones
class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def post(self, host: str, path: str, body: bytes, headers: bytes) -> tuple[int, bytes]:
        self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() +
                          b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                          b"\r\n" + headers + b"\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Client:
    """A pool of keep-alive connections to one server: a request takes an idle one or opens one."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 30.0):
        hostport = url.split("://", 1)[1]
        self.host, port = hostport.split(":")
        self.port = int(port)
        self.headers = b"".join(f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items())
        self.idle: list[tuple[Conn, float]] = []  # (connection, when it went idle)
        self.timeout = timeout

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = None
        while self.idle and conn is None:
            conn, since = self.idle.pop()
            if time.perf_counter() - since > IDLE_S:  # the server may have closed it: never reuse it
                conn.close()
                conn = None
        conn = conn or Conn(*await asyncio.open_connection(self.host, self.port))
        try:
            out = await asyncio.wait_for(conn.post(self.host, path, body, self.headers), self.timeout)
        except BaseException:
            conn.close()
            raise
        self.idle.append((conn, time.perf_counter()))
        return out

    def close(self) -> None:
        for c, _ in self.idle:
            c.close()
        self.idle.clear()


# -- measuring --------------------------------------------------------------------------------------------------
def percentiles(latencies_s: list[float]) -> dict:
    ms = np.asarray(latencies_s) * 1000.0
    if not len(ms):
        return {}
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "p99.9_ms": round(float(np.percentile(ms, 99.9)), 1),
            "max_ms": round(float(ms.max()), 1), "mean_ms": round(float(ms.mean()), 1)}


class CpuMeter:
    """CPU seconds of the server process (and its children), of this process and of the PostgreSQL server (its
    postmaster and backends) over a level, the sessions PostgreSQL opened in it (a connection pool that keeps
    too few connections opens and closes them under load: each is a forked backend), and the load average at
    its end."""

    def __init__(self, server_pid: int, pg_pid: int | None = None, pg_url: str | None = None):
        self.server = psutil.Process(server_pid)
        self.me = psutil.Process()
        self.pg = psutil.Process(pg_pid) if pg_pid else None
        self.pg_url = pg_url

    @staticmethod
    def _tree_cpu(proc: psutil.Process) -> float:
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += sum(p.cpu_times()[:2])
            except psutil.NoSuchProcess:  # a backend that ended meanwhile (its time is lost to the count)
                pass
        return total

    def _sessions(self) -> int | None:
        if self.pg_url is None:
            return None
        import psycopg

        with psycopg.connect(self.pg_url) as conn:
            return int(conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()[0] or 0)

    def _per_process(self) -> dict[int, float]:
        out = {}
        for p in [self.server, *self.server.children(recursive=True)]:
            try:
                out[p.pid] = sum(p.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return out

    def __enter__(self) -> Self:
        self.t0, self.s0, self.c0 = time.perf_counter(), self._tree_cpu(self.server), sum(self.me.cpu_times()[:2])
        self.w0 = self._per_process()
        self.p0 = self._tree_cpu(self.pg) if self.pg else None
        self.n0 = self._sessions()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        server = self._tree_cpu(self.server) - self.s0
        self.result = {"server_cpu_s": round(server, 2),
                       "loadgen_cpu_s": round(sum(self.me.cpu_times()[:2]) - self.c0, 2),
                       "server_cores": round(server / wall, 2),
                       # each server process's CPU seconds (the supervisor first, then the workers): how evenly
                       # the kernel spread the connections, and so the requests, over the workers
                       "server_cpu_s_by_process": [round(v - self.w0.get(pid, 0.0), 2)
                                                   for pid, v in self._per_process().items()],
                       "loadavg_1m_end": round(os.getloadavg()[0], 2)}
        if self.pg is not None:
            self.result["postgres_cpu_s"] = round(self._tree_cpu(self.pg) - self.p0, 2)
        if self.n0 is not None:
            self.result["postgres_new_sessions"] = self._sessions() - self.n0 - 1  # less the meter's own


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """stage -> (seconds, requests) so far from /metrics' `dragonrec_recommend_stage_seconds`, summed over the
    workers (they share a PROMETHEUS_MULTIPROC_DIR)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name != "dragonrec_recommend_stage_seconds":
            continue
        for sample in family.samples:
            k = {"dragonrec_recommend_stage_seconds_sum": 0, "dragonrec_recommend_stage_seconds_count": 1}.get(sample.name)
            if k is not None:
                out.setdefault(sample.labels["stage"], [0.0, 0.0])[k] = sample.value
    return {stage: (v[0], v[1]) for stage, v in out.items()}


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean milliseconds per request of each stage between two `stage_totals`."""
    out = {}
    for stage, (s1, n1) in after.items():
        s0, n0 = before.get(stage, (0.0, 0.0))
        if n1 > n0:
            out[stage] = round(1000 * (s1 - s0) / (n1 - n0), 2)
    return out


async def drain(pid: int, max_s: float = 300.0) -> float:
    """Wait until the server is idle (under 0.1 core over half a second): requests whose client gave up at
    an overloaded level still run to the end in its thread pool and would be charged to the next level.
    Returns the seconds waited."""
    proc = psutil.Process(pid)

    def used() -> float:  # the server and its worker processes
        return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])

    t0 = time.perf_counter()
    last = used()
    while time.perf_counter() - t0 < max_s:
        await asyncio.sleep(0.5)
        now = used()
        if now - last < 0.05:
            break
        last = now
    return round(time.perf_counter() - t0, 1)


async def open_loop(client: Client, path: str, bodies: list[bytes], rate: float, max_requests: int,
                    max_seconds: float, max_in_flight: int, seed: int, count=None) -> dict:
    """Poisson arrivals at `rate`/s for at most max_requests or max_seconds of arrivals; latency from each
    request's scheduled time. `count(body_bytes) -> int` counts the units a 200 answer accepted (events)."""
    rng = np.random.default_rng(seed)
    n = int(min(max_requests, max(1, rate * max_seconds)))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors: dict[str, int] = {}
    units = 0
    in_flight = 0
    late: list[float] = []
    tasks = []

    async def one(k: int, scheduled: float) -> None:
        nonlocal in_flight, units
        try:
            status, body = await client.post(path, bodies[k % len(bodies)])
            if status == 200:
                lat.append(loop.time() - scheduled)
                if count is not None:
                    units += count(body)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
        except Exception as e:  # noqa: BLE001 - counted, by kind
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        finally:
            in_flight -= 1

    t0 = loop.time() + 0.05
    for k in range(n):
        at = t0 + arrivals[k]
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append(loop.time() - at)
        if in_flight >= max_in_flight:
            errors["dropped"] = errors.get("dropped", 0) + 1
            continue
        in_flight += 1
        tasks.append(asyncio.ensure_future(one(k, at)))
    await asyncio.gather(*tasks)
    wall = loop.time() - t0
    out = {"target_rate": rate, "sent": len(tasks), "ok": len(lat), "errors": errors,
           "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 1),
           "send_lag_p99_ms": round(float(np.percentile(late, 99)) * 1000, 1) if late else None,
           **percentiles(lat)}
    if count is not None:
        out["units_per_s"] = round(units / wall, 1)
        out["units"] = units
    return out


async def closed_loop(client: Client, path: str, bodies: list[bytes], concurrency: int, max_requests: int,
                      max_seconds: float) -> dict:
    lat: list[float] = []
    errors: dict[str, int] = {}
    next_k = 0
    t_end = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_k
        while next_k < max_requests and time.perf_counter() < t_end:
            k = next_k
            next_k += 1
            t = time.perf_counter()
            try:
                status, _ = await client.post(path, bodies[k % len(bodies)])
                if status == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
            except Exception as e:  # noqa: BLE001 - counted, by kind
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "ok": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 1), **percentiles(lat)}


# -- catalogs ---------------------------------------------------------------------------------------------------
def synthetic_dataset(out: Path, n_items: int, n_users: int, seed: int, cache_dir: Path,
                      model_shape: dict) -> tuple[Path, Path]:
    """Write a synthetic dataset (items.parquet, interactions.parquet), random unit text vectors into
    `cache_dir` under the MiniLM embedder's name, and an untrained sasrec model over every item.
    Returns (dataset dir, model dir)."""
    from dragonrec.data import load_dataset
    from dragonrec.embed import MiniLMEmbedder, normalize, open_cache, text_key
    from dragonrec.model.lm import ItemTokenizer, SeqRecLM
    from dragonrec.recommenders.sequential import SequentialConfig, SequentialRecommender
    from dragonrec.text import TextTemplate, catalog_texts

    rng = np.random.default_rng(seed)
    data, model_dir = out / "data", out / "model"
    done = out / "prepared.json"
    spec = {"items": n_items, "users": n_users, "seed": seed, "model_shape": model_shape}
    if done.exists() and json.loads(done.read_text()) == spec:  # made by an earlier run with --synthetic-dir
        print(f"reusing the synthetic catalog in {out}", flush=True)
        return data, model_dir
    data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ids = np.char.add("s", np.char.zfill(np.arange(n_items).astype(str), 7))
    items = pd.DataFrame({"item_id": ids,
                          "title": np.char.add("synthetic product ", np.arange(n_items).astype(str)),
                          "brand": np.char.add("brand ", (np.arange(n_items) % 2000).astype(str)),
                          "category": np.char.add("Category ", (np.arange(n_items) % 300).astype(str)),
                          "price": np.round(rng.uniform(1, 100, n_items), 2)})
    items.to_parquet(data / "items.parquet", index=False)
    # users of 2..20 events, items by a Zipf-like popularity (a long tail, as shops have)
    lengths = rng.integers(2, 21, size=n_users)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    picks = rng.choice(n_items, size=int(lengths.sum()), p=pop / pop.sum())
    users = np.repeat(np.char.add("su", np.arange(n_users).astype(str)), lengths)
    step = np.concatenate([np.arange(k) for k in lengths])
    events = pd.DataFrame({"user_id": users, "item_id": ids[picks],
                           "action": rng.choice(["purchase", "view", "click"], size=len(picks), p=[0.4, 0.4, 0.2]),
                           "timestamp": 1_600_000_000 + 3600 * step})
    events.to_parquet(data / "interactions.parquet", index=False)
    ds = load_dataset(data)
    print(f"synthetic dataset: {n_items} items, {len(events)} events, {n_users} users "
          f"({time.perf_counter() - t:.0f}s)", flush=True)
    t = time.perf_counter()
    texts = catalog_texts(ds.catalog, TextTemplate())
    cache = open_cache(cache_dir, MiniLMEmbedder.name, MiniLMEmbedder.dim)
    for s in range(0, n_items, 200_000):
        chunk = texts[s:s + 200_000]
        vec = normalize(rng.standard_normal((len(chunk), MiniLMEmbedder.dim), dtype=np.float32))
        cache.put([text_key(x) for x in chunk], vec)
    print(f"random text vectors written to {cache_dir} ({time.perf_counter() - t:.0f}s)", flush=True)
    cfg = SequentialConfig(**{**model_shape, "use_text": False, "text_cache_dir": None})
    rec = SequentialRecommender(cfg)
    rec.catalog = ds.catalog
    rec.tokenizer = ItemTokenizer.from_train(ds.events["item_idx"].to_numpy(), n_items, cfg.vocab_seed,
                                             with_all_items=True)
    rec.model = SeqRecLM(cfg.model_part(), rec.tokenizer.n_items, rec.tokenizer.n_items).eval()
    rec.save(model_dir)
    done.write_text(json.dumps(spec))
    return data, model_dir


def beauty_model_shape() -> dict:
    """The Beauty model's width, depth, length and narrative mode (the synthetic model copies them)."""
    keys = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_len", "narrative", "arch")
    meta = BEAUTY_MODEL / "recommender.json"
    if not meta.exists():
        return {}
    cfg = json.loads(meta.read_text())["config"]
    return {k: cfg[k] for k in keys if k in cfg}


def recommend_bodies(events: pd.DataFrame, n: int, seed: int) -> list[bytes]:
    users = events["user_id"].unique()
    pick = np.random.default_rng(seed).choice(users, size=min(n, len(users)), replace=False)
    return [json.dumps({"user_id": str(u), "n": 10, "surface": "load"}).encode() for u in pick]


def event_bodies(events: pd.DataFrame, n_requests: int, batch: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    rows = events.iloc[rng.choice(len(events), size=n_requests * batch)]
    acts = rng.choice(list(ACTION_MIX), size=len(rows), p=list(ACTION_MIX.values()))
    evs = [{"event_id": uuid.uuid4().hex, "user_id": str(u), "item_id": str(i), "action": str(a)}
           for u, i, a in zip(rows["user_id"], rows["item_id"], acts)]
    return [json.dumps({"events": evs[k:k + batch]}).encode() for k in range(0, len(evs), batch)]


def accepted(body: bytes) -> int:
    return int(json.loads(body)["accepted"])


# -- the run ----------------------------------------------------------------------------------------------------
def run(args, data: Path, model_dir: Path | None, cache_dir: Path, work: Path) -> dict:
    from dragonrec.registry import Registry
    from dragonrec.store.pgtemp import TempPostgres

    state = work / "state"
    env = {"DRAGONREC_DATA_DIR": str(data), "DRAGONREC_STATE_DIR": str(state),
           "DRAGONREC_REGISTRY_DIR": str(state / "registry"), "DRAGONREC_API_KEY": API_KEY,
           "DRAGONREC_EMBEDDING_CACHE_DIR": str(cache_dir), "DRAGONREC_MAX_EVENTS_PER_BATCH": "1000",
           "DRAGONREC_BATCH_INFERENCE": str(not args.no_batching).lower(),
           "DRAGONREC_BATCH_MAX_WAIT_MS": str(args.batch_wait_ms),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.switch_interval_ms is not None:
        env["DRAGONREC_SWITCH_INTERVAL_MS"] = str(args.switch_interval_ms)
    if model_dir is not None:
        Registry(state / "registry").register(model_dir, method="sft", activate=True, note="bench_load")
    shared = work / "metrics"  # the workers' shared metrics: /metrics sums them (stage times per level)
    shared.mkdir(parents=True, exist_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    pg = TempPostgres(fsync=True, settings=dict(kv.split("=", 1) for kv in args.pg_setting))
    env["DRAGONREC_STORE_URL"] = pg.start()
    events = pd.read_parquet(data / "interactions.parquet", columns=["user_id", "item_id"])
    out: dict = {}
    try:
        with Server(env, work / "server.log", ["--workers", str(args.workers)] if args.workers > 1 else []) as server:
            health = json.loads(__import__("httpx").get(server.url + "/health", timeout=30).text)
            print(f"up in {server.startup_s:.0f}s serving {health['model_version']} over "
                  f"{health['catalog_items']} items", flush=True)
            out.update(startup_s=round(server.startup_s, 1), model_version=health["model_version"],
                       catalog_items=health["catalog_items"], server_rss_mb=round(sum(
                           p.memory_info().rss for p in [psutil.Process(server.proc.pid),
                                                         *psutil.Process(server.proc.pid).children(recursive=True)])
                           / 2**20))
            bodies = recommend_bodies(events, 20_000, args.seed)
            pg_pid = int((pg.directory / "data" / "postmaster.pid").read_text().split()[0])
            cpu = CpuMeter(server.proc.pid, pg_pid, "postgresql://" + pg.url.split("://", 1)[1])

            async def levels() -> None:
                client = Client(server.url)
                keyed = Client(server.url, {"X-API-Key": API_KEY})
                await drain(server.proc.pid)  # every worker has loaded (the first one up answers /health)
                t = time.perf_counter()
                warm = await closed_loop(client, "/v1/recommend", bodies[-args.warmup:], 2, args.warmup, 300)
                print(f"warm-up: {warm} ({time.perf_counter() - t:.0f}s)", flush=True)
                await drain(server.proc.pid)
                k = 0
                out["recommend_open_loop"] = {}
                for rate in args.rates:
                    before = stage_totals(server.url)
                    with cpu:
                        r = await open_loop(client, "/v1/recommend", bodies[k:], rate, args.requests, args.seconds,
                                            args.max_in_flight, args.seed + k)
                    k += r["sent"]
                    out["recommend_open_loop"][str(rate)] = {**r, **cpu.result,
                                                             "drain_after_s": await drain(server.proc.pid),
                                                             "stage_mean_ms": stage_means(before,
                                                                                          stage_totals(server.url))}
                    print(f"recommend {rate}/s: {out['recommend_open_loop'][str(rate)]}", flush=True)
                out["recommend_closed_loop"] = {}
                for c in args.concurrency:
                    before = stage_totals(server.url)
                    with cpu:
                        r = await closed_loop(client, "/v1/recommend", bodies[k:], c, args.requests, args.seconds)
                    k += r["ok"] + sum(r["errors"].values())
                    out["recommend_closed_loop"][str(c)] = {**r, **cpu.result,
                                                            "drain_after_s": await drain(server.proc.pid),
                                                            "stage_mean_ms": stage_means(before,
                                                                                         stage_totals(server.url))}
                    print(f"recommend c={c}: {out['recommend_closed_loop'][str(c)]}", flush=True)
                out["events_open_loop"] = {}
                for spec in args.event_levels:
                    batch, ev_rate = (int(x) for x in spec.split("@"))
                    rate = ev_rate / batch
                    n_req = int(min(args.requests, rate * args.seconds))
                    ebodies = event_bodies(events, n_req, batch, args.seed + batch)
                    with cpu:
                        r = await open_loop(keyed, "/v1/events", ebodies, rate, args.requests, args.seconds,
                                            args.max_in_flight, args.seed, count=accepted)
                    out["events_open_loop"][spec] = {"batch": batch, "target_events_per_s": ev_rate, **r,
                                                     **cpu.result, "drain_after_s": await drain(server.proc.pid)}
                    print(f"events {spec}: {out['events_open_loop'][spec]}", flush=True)
                client.close()
                keyed.close()

            asyncio.run(levels())
    finally:
        pg.stop()
    return out


def profile(args, data: Path, model_dir: Path | None, cache_dir: Path, work: Path) -> dict:
    """In-process: the pipeline's own stage timings over `--profile` requests of warm users, plus cProfile's
    top functions by cumulative time (SQLite store in a temp dir: the store's share shows separately)."""
    import cProfile
    import io
    import pstats

    from dragonrec.registry import Registry
    from dragonrec.serve import Service, Settings
    from dragonrec.serve.schemas import RecommendRequest

    state = work / "state"
    if model_dir is not None:
        Registry(state / "registry").register(model_dir, method="sft", activate=True, note="profile")
    s = Settings(data_dir=data, state_dir=state, embedding_cache_dir=str(cache_dir),
                 batch_inference=not args.no_batching)
    with Service(s) as service:
        users = service.events["user_id"].unique()
        pick = np.random.default_rng(args.seed).choice(users, size=args.profile + 20, replace=False)
        for u in pick[:20]:
            service.recommend(RecommendRequest(user_id=str(u), n=10))
        stages: dict[str, list[float]] = {}
        pipe = service.serving.pipeline
        orig = pipe.recommend_for

        def timed(*a, **kw):
            recs = orig(*a, **kw)
            for k, v in recs.timings.items():
                stages.setdefault(k, []).append(v)
            return recs

        pipe.recommend_for = timed
        total = []
        prof = cProfile.Profile()
        for u in pick[20:]:
            t = time.perf_counter()
            prof.enable()
            service.recommend(RecommendRequest(user_id=str(u), n=10))
            prof.disable()
            total.append(time.perf_counter() - t)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
        report = {"model_version": service.model_version, "requests": args.profile,
                  "service_recommend_ms": {"p50": round(1000 * float(np.median(total)), 2),
                                           "mean": round(1000 * float(np.mean(total)), 2)},
                  "pipeline_stages_ms_mean": {k: round(1000 * float(np.mean(v)), 2) for k, v in stages.items()},
                  "cprofile_top": buf.getvalue().splitlines()[:80]}
        pipe.recommend_for = orig
        if args.profile_threads:  # the same requests from concurrent threads, no HTTP: what batching shares
            from concurrent.futures import ThreadPoolExecutor

            more = np.random.default_rng(args.seed + 1).choice(users, size=args.profile, replace=False)

            def ask(u) -> float:
                t = time.perf_counter()
                service.recommend(RecommendRequest(user_id=str(u), n=10))
                return time.perf_counter() - t

            t = time.perf_counter()
            with ThreadPoolExecutor(args.profile_threads) as pool:
                lat = list(pool.map(ask, more))
            wall = time.perf_counter() - t
            model = getattr(pipe.model, "model", None)
            report["threads"] = {"threads": args.profile_threads, "requests": len(more),
                                 "throughput_rps": round(len(more) / wall, 1),
                                 "p50_ms": round(1000 * float(np.median(lat)), 1),
                                 "rank_batches": None if pipe.rank_batcher is None else
                                 pipe.rank_batcher.stats.as_dict(),
                                 "model_batches": model.stats() if hasattr(model, "stats") else None}
    print(json.dumps({k: v for k, v in report.items() if k != "cprofile_top"}, indent=1), flush=True)
    print("\n".join(report["cprofile_top"]))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", choices=["beauty", "synthetic"], default="beauty")
    p.add_argument("--data", type=Path, default=BEAUTY, help="the Beauty dataset directory")
    p.add_argument("--model-dir", type=Path, default=None,
                   help=f"Beauty: the saved model to serve (default {BEAUTY_MODEL.relative_to(ROOT)} when it exists)")
    p.add_argument("--no-model", action="store_true", help="Beauty: serve the fallback pipeline (no model)")
    p.add_argument("--items", type=int, default=1_000_000, help="synthetic catalog size")
    p.add_argument("--users", type=int, default=50_000, help="synthetic users")
    p.add_argument("--synthetic-dir", type=Path, default=None,
                   help="keep the synthetic catalog here and reuse it on the next run (default: a temp dir)")
    p.add_argument("--prepare-only", action="store_true", help="only write the synthetic catalog")
    p.add_argument("--rates", default="25,50,100,200", help="recommend arrival rates (requests/s)")
    p.add_argument("--concurrency", default="1,10,50", help="closed-loop clients")
    p.add_argument("--event-levels", default="1@250,1@500,10@2000,100@2000,100@5000",
                   help="events: BATCH@EVENTS_PER_S, comma-separated")
    p.add_argument("--requests", type=int, default=3000, help="requests per level (bound)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of arrivals per level (bound)")
    p.add_argument("--max-in-flight", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (one per core)")
    p.add_argument("--no-batching", action="store_true", help="serve with batch_inference off")
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="the server's thread switch interval (setting switch_interval_ms; default Python's 5 ms)")
    p.add_argument("--profile", type=int, default=0, help="profile this many requests in-process instead")
    p.add_argument("--profile-threads", type=int, default=0,
                   help="with --profile: then as many requests again from this many threads")
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a PostgreSQL server setting for the run (repeatable), e.g. synchronous_commit=off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.event_levels = [e for e in args.event_levels.split(",") if e]
    work = Path(tempfile.mkdtemp(prefix="dragonrec-bench-load-"))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "loadavg_start": os.getloadavg()},
              "catalog": args.catalog, "workers": args.workers, "batching": not args.no_batching, "batch_wait_ms": args.batch_wait_ms,
              "switch_interval_ms": args.switch_interval_ms, "pg_settings": args.pg_setting,
              "bounds": {"requests_per_level": args.requests, "seconds_per_level": args.seconds,
                         "max_in_flight": args.max_in_flight}}
    try:
        if args.catalog == "beauty":
            data, cache_dir = args.data.resolve(), ROOT / ".cache" / "embeddings"
            model_dir = None if args.no_model else (args.model_dir or (
                BEAUTY_MODEL if (BEAUTY_MODEL / "recommender.json").exists() else None))
        else:
            where = args.synthetic_dir or work / "synthetic"
            cache_dir = where / "embeddings"
            t = time.perf_counter()
            data, model_dir = synthetic_dataset(where, args.items, args.users, args.seed, cache_dir,
                                                beauty_model_shape())
            report["synthetic"] = {"items": args.items, "users": args.users, "prepare_s":
                                   round(time.perf_counter() - t, 1), "model_shape": beauty_model_shape(),
                                   "text_vectors": "random unit vectors (not MiniLM)", "model": "untrained sasrec"}
        report["model_dir"] = str(model_dir) if model_dir else None
        if model_dir is not None:
            report["model"] = json.loads((model_dir / "recommender.json").read_text())["name"]
        if args.prepare_only:
            return
        if args.profile:
            report["profile"] = profile(args, data, model_dir, cache_dir, work)
        else:
            report.update(run(args, data, model_dir, cache_dir, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
