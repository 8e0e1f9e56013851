"""Learning from human interaction, measured: rounds of serve -> feedback -> update through the simulator.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_loop.py --base runs/beauty/generative/model \
        --rounds 5 --seeds 0 1 --out benchmarks/results/loop_beauty.json --plot docs/img/loop_beauty.png

Users: the leave-one-out test cases of Amazon Beauty (`users_from_split(start="test")`), divided per seed into
disjoint groups: feedback users (a fresh `--feedback-users` of them each round), gate users (the loop's
held-out NDCG gate) and evaluation users (every number reported). Each round, the active version serves the
round's feedback users epsilon-greedily (`--epsilon` of requests get a random order of its top `--pool`; the
propensities are logged), the simulator answers, the logs go into a real SQLite store, and
`dragonrec.loop.FeedbackLoop` runs one round of the method (rewards -> preferences -> fine-tune -> gate ->
promote in a real registry). After each round the active version is measured on the evaluation users: the
simulated reward per impression (greedy top 10, the same users and random numbers for every method in a
round), held-out NDCG@10 / HR@10, catalog coverage, intra-list diversity and the share of the 1% most popular
items. Methods: static (the SFT model, never updated), sft (re-trained on the new interactions), dpo,
sdpo (multi-negative), pg (policy gradient; its reward is the simulator's expected reward for the feedback
users' contexts, the simulator standing in for the live environment; it never sees evaluation users).
The off-policy estimate (SNIPS per slot) the gate computed for each candidate is set beside the value the
candidate then earned on the same feedback users and draws, served greedily.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.data.provenance import check_held_out
from dragonrec.evaluate import evaluate_cases
from dragonrec.evaluate.experiment import saved_recommender_name
from dragonrec.evaluate.off_policy import EpsilonGreedyPolicy
from dragonrec.evaluate.simulator import (
    RecommenderPolicy,
    Simulator,
    SimUser,
    summarize_seeds,
    users_from_split,
)
from dragonrec.loop import FeedbackLoop, GateConfig, LoopConfig
from dragonrec.recommenders import recommender_class
from dragonrec.recommenders.sequential import item_text_embeddings
from dragonrec.registry import Registry
from dragonrec.store import Store

METHOD_DEFAULTS = {
    "sft": {"lr": 2e-4, "max_epochs": 1},
    "dpo": {"lr": 1e-4, "beta": 0.1, "epochs": 1, "batch_size": 32, "quiet": True},
    "sdpo": {"lr": 1e-4, "beta": 0.1, "epochs": 1, "batch_size": 32, "quiet": True},
    "pg": {"lr": 1e-4, "epochs": 1, "batch_size": 16, "group_size": 8, "kl_coef": 0.05, "quiet": True},
}


def method_overrides(defaults: dict[str, dict], pairs: list[str]) -> dict[str, dict]:
    """`defaults` with `method.field=value` pairs on top (values read as JSON where they parse: 1e-3, true)."""
    out = {m: dict(v) for m, v in defaults.items()}
    for kv in pairs:
        key, value = kv.split("=", 1)
        m, f = key.split(".", 1)
        try:
            out.setdefault(m, {})[f] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(m, {})[f] = value
    return out


class ContextUsers:
    """Finds the simulated user a context belongs to (its history starts with theirs): the pg reward."""

    def __init__(self, users: list[SimUser], sim: Simulator):
        self.sim = sim
        self.by_prefix = {(len(u.history), tuple(u.history.tolist())): u for u in users}
        self.lengths = sorted({len(u.history) for u in users})

    def user(self, history: np.ndarray) -> SimUser | None:
        h = history.tolist()
        for n in self.lengths:
            if n > len(h):
                break
            u = self.by_prefix.get((n, tuple(h[:n])))
            if u is not None:
                return u
        return None

    def __call__(self, histories, actions, lists) -> np.ndarray:
        users = [self.user(np.asarray(h)) for h in histories]
        out = np.zeros(np.asarray(lists).shape)
        known = [i for i, u in enumerate(users) if u is not None]
        if known:
            out[known] = self.sim.expected_rewards([users[i] for i in known], np.asarray(lists)[known])
        return out


def load(path: Path, catalog):
    return recommender_class(saved_recommender_name(path)).load(path, catalog)


def measure(model, sim: Simulator, users: list[SimUser], cases, train, vectors, seed: int, version: str) -> dict:
    log = sim.run(RecommenderPolicy(model, version), users, seed=seed)
    s = log.summary()
    off = evaluate_cases(model, cases, train=train, embeddings=vectors)
    return {"reward_per_impression": s["reward_per_impression"], "ctr": s["ctr"],
            "purchases_per_impression": s["purchases_per_impression"], "ndcg@10": off["metrics"]["ndcg@10"],
            "hr@10": off["metrics"]["hr@10"], **{k: v for k, v in off["beyond"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--base", default="runs/beauty/generative/model")
    ap.add_argument("--methods", nargs="+", default=["static", "sft", "dpo", "sdpo", "pg"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--feedback-users", type=int, default=1000)
    ap.add_argument("--gate-users", type=int, default=1000)
    ap.add_argument("--eval-users", type=int, default=1500)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--pool", type=int, default=50)
    ap.add_argument("--max-ndcg-drop", type=float, default=0.02)
    ap.add_argument("--set", nargs="*", default=[], help="method.field=value, e.g. dpo.beta=0.5")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--workdir", default="runs/loop_bench")
    ap.add_argument("--out", default="benchmarks/results/loop_beauty.json")
    ap.add_argument("--plot", default="docs/img/loop_beauty.png")
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from the results in --out")
    args = ap.parse_args()
    if args.replot:
        return replot(args.out, args.plot)
    t0 = time.time()
    overrides = method_overrides(METHOD_DEFAULTS, args.set)

    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    check_held_out(args.base, split, ds.catalog.item_ids)
    vectors = item_text_embeddings(ds.catalog, args.cache_dir)
    sim = Simulator(ds.catalog, split.train, item_vectors=vectors)
    users = users_from_split(split, start="test")
    index = {u: i for i, u in enumerate(split.test.user_ids)}
    # What the store's histories start from: every event before each user's test target.
    base_events = pd.concat([split.train, split.valid.as_events(ds.catalog.item_ids)], ignore_index=True)
    base_events = base_events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    report: dict = {"command": " ".join(["benchmarks/bench_loop.py", *sys.argv[1:]]), "args": vars(args),
                    "method_config": overrides, "runs": {}}

    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(users))
        need_fb = args.rounds * args.feedback_users
        fb_idx = order[:need_fb]
        gate_idx = order[need_fb:need_fb + args.gate_users]
        eval_idx = order[need_fb + args.gate_users:need_fb + args.gate_users + args.eval_users]
        if len(eval_idx) < args.eval_users:
            raise SystemExit(f"{len(users)} users are too few for these group sizes")
        gate_cases = split.test.subset(np.asarray([index[users[i].user_id] for i in gate_idx]))
        eval_users = [users[i] for i in eval_idx]
        eval_cases = split.test.subset(np.asarray([index[u.user_id] for u in eval_users]))
        for method in args.methods:
            t_run = time.time()
            work = Path(args.workdir) / f"seed{seed}" / method
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            reg = Registry(work / "registry")
            reg.register(args.base, method="sft", activate=True, note="the SFT base of the loop benchmark")
            store = Store.open(work / "store.db", items=ds.catalog)
            fb_all = [users[i] for i in fb_idx]
            loop = None
            if method != "static":
                cfg = LoopConfig(method=method, method_config=overrides.get(method, {}), seed=seed,
                                 gate=GateConfig(max_ndcg_drop=args.max_ndcg_drop, off_policy="when_logged"))
                loop = FeedbackLoop(reg, store, ds.catalog, base_events, gate_cases, cfg,
                                    reward_fn=ContextUsers(fb_all, sim), quiet=True)
            model = load(reg.active().path, ds.catalog)
            rows = [{"round": 0, "version": reg.active_version(), "status": "base",
                     **measure(model, sim, eval_users, eval_cases, split.train, vectors, 10_000 * (seed + 1),
                               reg.active_version())}]
            print(f"seed {seed} {method:6s} round 0: {json.dumps({k: round(v, 4) for k, v in rows[0].items() if isinstance(v, float)})}",
                  flush=True)
            for r in range(1, args.rounds + 1):
                t_round = time.time()
                fb = fb_all[(r - 1) * args.feedback_users: r * args.feedback_users]
                row: dict = {"round": r}
                if loop is not None:
                    serve = EpsilonGreedyPolicy(model, epsilon=args.epsilon, pool=args.pool, seed=seed * 100 + r,
                                                version=reg.active_version())
                    log = sim.run(serve, fb, seed=seed * 1000 + r)
                    store.write(events=log.events, impressions=log.impressions)
                    served = log.summary()
                    res = loop.run_round()
                    row.update(status=res.status, reason=res.reason, version=res.version or reg.active_version(),
                               served_reward_per_impression=served["reward_per_impression"],
                               records=res.data.get("records"), train_seconds=res.train.get("seconds"),
                               gate=res.gate)
                    ope, ope_ref = res.gate.get("off_policy"), res.gate.get("off_policy_active")
                    if ope is not None and loop.last_candidate is not None:
                        # What the candidate and the active version really earn on these users and draws,
                        # served greedily, per slot: the truth the off-policy estimates tried to guess.
                        def real(m, fb=fb, s=seed * 1000 + r):
                            return float(sim.run(RecommenderPolicy(m), fb, seed=s).rewarded()["reward"].mean())
                        row["ope"] = {"snips": ope["estimate"], "ips": ope["ips"], "ess": ope["ess"],
                                      "logged": ope["logged"], "candidate_real_per_slot": real(loop.last_candidate),
                                      "active_snips": ope_ref["estimate"], "active_ess": ope_ref["ess"],
                                      "active_real_per_slot": real(model)}
                    if res.status == "promoted":
                        model = load(reg.active().path, ds.catalog)
                else:
                    row.update(status="static", version=reg.active_version())
                row.update(measure(model, sim, eval_users, eval_cases, split.train, vectors,
                                   10_000 * (seed + 1) + r, reg.active_version()))
                row["seconds"] = round(time.time() - t_round, 1)
                rows.append(row)
                print(f"seed {seed} {method:6s} round {r}: {row['status']:9s} reward/imp "
                      f"{row['reward_per_impression']:+.4f} NDCG@10 {row['ndcg@10']:.4f} "
                      f"({row['seconds']} s) {row.get('reason', '')[:120]}", flush=True)
            store.close()
            report["runs"].setdefault(str(seed), {})[method] = {"rounds": rows,
                                                                "seconds": round(time.time() - t_run, 1)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    report["summary"] = summarize(report, args.methods, args.rounds)
    report["total_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print_table(report["summary"])
    if args.plot:
        plot(report, args.methods, args.plot)
    print(f"wrote {args.out} ({report['total_s']} s)")


def summarize(report: dict, methods: list[str], rounds: int) -> dict:
    out = {}
    for m in methods:
        per_round = []
        for r in range(rounds + 1):
            vals = [report["runs"][s][m]["rounds"][r] for s in report["runs"] if m in report["runs"][s]]
            per_round.append({k: summarize_seeds([v[k] for v in vals]) for k in
                              ("reward_per_impression", "ndcg@10", "hr@10", "coverage@10", "ild_embedding@10",
                               "top1pct_share@10") if k in vals[0]})
        promoted = sum(row.get("status") == "promoted" for s in report["runs"] if m in report["runs"][s]
                       for row in report["runs"][s][m]["rounds"])
        out[m] = {"per_round": per_round, "promoted_rounds": promoted}
    return out


def print_table(summary: dict) -> None:
    print("| method | round | reward / impression | NDCG@10 | HR@10 | coverage@10 | ILD@10 | top-1% share |")
    print("|---|---|---|---|---|---|---|---|")
    for m, s in summary.items():
        for r, row in enumerate(s["per_round"]):
            def f(k, d=4, row=row):
                v = row.get(k)
                return "" if v is None else f"{v['mean']:.{d}f} ± {v['std'] if np.isfinite(v['std']) else 0:.{d}f}"
            print(f"| {m} | {r} | {f('reward_per_impression')} | {f('ndcg@10')} | {f('hr@10')} | "
                  f"{f('coverage@10')} | {f('ild_embedding@10', 3)} | {f('top1pct_share@10', 3)} |")


def plot(report: dict, methods: list[str], path: str) -> None:
    """Left: simulated reward per impression minus the static model's, paired by seed and round (the same
    users and draws); right: held-out NDCG@10. Mean over seeds, band = one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    seeds = [s for s in runs if all(m in runs[s] for m in methods)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        for ax, key in zip(axes, ("reward_per_impression", "ndcg@10")):
            vals = np.array([[row[key] for row in runs[s][m]["rounds"]] for s in seeds])
            if key == "reward_per_impression" and "static" in methods:
                vals = vals - np.array([[row[key] for row in runs[s]["static"]["rounds"]] for s in seeds])
            x = np.arange(vals.shape[1])
            mean, std = vals.mean(axis=0), vals.std(axis=0)
            ax.plot(x, mean, marker="o", label=m)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    axes[0].set_title("reward per impression minus static (evaluation users)")
    axes[1].set_title("held-out NDCG@10 (evaluation users)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Amazon Beauty through the simulator, {len(seeds)} seeds", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def replot(json_path: str, plot_path: str) -> None:
    report = json.loads(Path(json_path).read_text())
    plot(report, list(report["summary"]), plot_path)


if __name__ == "__main__":
    main()
