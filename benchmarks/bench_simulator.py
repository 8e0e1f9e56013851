"""Does the simulator agree with offline evaluation? Rank the landed recommenders by simulated reward per
impression and by held-out NDCG@10 on the same users, side by side, over several seeds.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_simulator.py --data ../shared/data/amazon-beauty \
        --sasrec runs/beauty/sasrec/model --generative runs/beauty/generative/model \
        --users 4000 --seeds 5 --out benchmarks/results/simulator_beauty.json

Users: the leave-one-out split's test cases (history = everything before the test target, future = the test
target: `users_from_split(start="test")`), split 50/50 into feedback and evaluation users with seed 0; only
evaluation users are simulated and ranked here (the feedback half is the feedback loop's). Each seed draws
`--users` of them and runs every policy on the same users with the same random numbers (common random
numbers: differences between policies are not draw noise). Saved models are loaded, never trained here, and
refused if they may have trained on these test targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import leave_one_out, load_dataset
from dragonrec.data.provenance import check_held_out
from dragonrec.evaluate import evaluate_cases
from dragonrec.evaluate.experiment import saved_recommender_name
from dragonrec.evaluate.simulator import (
    RecommenderPolicy,
    Simulator,
    SimulatorConfig,
    split_users,
    summarize_seeds,
    users_from_split,
)
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.recommenders import build, recommender_class
from dragonrec.recommenders.sequential import item_text_embeddings
from dragonrec.scorers.model import ModelScorer

KEYS = ("reward_per_impression", "ctr", "purchases_per_impression", "users_finding_future", "scroll_past_share")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--sasrec", default="runs/beauty/sasrec/model")
    ap.add_argument("--generative", default="runs/beauty/generative/model")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--users", type=int, default=4000, help="evaluation users drawn per seed")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="policies to run (default: all available)")
    ap.add_argument("--out", default="benchmarks/results/simulator_beauty.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = SimulatorConfig()
    report: dict = {"command": " ".join(["benchmarks/bench_simulator.py", *sys.argv[1:]]), "data": args.data,
                    "simulator": cfg.model_dump(), "users_per_seed": args.users, "seeds": args.seeds}
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    vectors = item_text_embeddings(ds.catalog, args.cache_dir)
    sim = Simulator(ds.catalog, split.train, cfg, item_vectors=vectors)
    users = users_from_split(split, start="test")
    feedback, evaluation = split_users(users, 0.5, seed=0)
    report["users"] = {"all": len(users), "feedback": len(feedback), "evaluation": len(evaluation)}
    index = {u: i for i, u in enumerate(split.test.user_ids)}
    eval_cases = split.test.subset(np.asarray([index[u.user_id] for u in evaluation]))

    policies: dict = {}
    cooc = build("cooccurrence").fit(split.train, ds.catalog)
    policies["popularity"] = build("popularity").fit(split.train, ds.catalog)
    policies["cooccurrence"] = cooc
    dense = DenseConfig(cache_dir=args.cache_dir)
    policies["rag (dense 500, co-occurrence scorer)"] = Pipeline(
        PipelineConfig.rag(k=500, scorer="none", dense=dense), scorer=ModelScorer(cooc)).fit(split.train, ds.catalog)
    for name, path in (("sasrec", args.sasrec), ("generative", args.generative)):
        if path and Path(path).exists():
            check_held_out(path, split, ds.catalog.item_ids)
            policies[name] = recommender_class(saved_recommender_name(Path(path))).load(Path(path), ds.catalog)
        else:
            print(f"{name}: no saved model at {path}; skipped", flush=True)
    if "generative" in policies:
        policies["pipeline (union, generative scorer)"] = Pipeline(
            PipelineConfig.union(model="generative", scorer="model", dense=dense),
            model=policies["generative"]).fit(split.train, ds.catalog)
    if args.only:
        policies = {k: v for k, v in policies.items() if k in args.only}

    rows = {}
    for name, rec in policies.items():
        t = time.perf_counter()
        off = evaluate_cases(rec, eval_cases, train=split.train)["metrics"]
        per_seed = {k: [] for k in KEYS}
        by_pos = []
        for seed in range(args.seeds):
            pick = np.random.default_rng(1000 + seed).choice(len(evaluation), min(args.users, len(evaluation)),
                                                             replace=False)
            log = sim.run(RecommenderPolicy(rec, name), [evaluation[i] for i in np.sort(pick)], seed=seed)
            s = log.summary()
            for k in KEYS:
                per_seed[k].append(s[k])
            by_pos.append(s["ctr_by_position"])
        rows[name] = {"test_ndcg@10": off["ndcg@10"], "test_hr@10": off["hr@10"], "cases": off["cases"],
                      **{k: summarize_seeds(v) | {"per_seed": v} for k, v in per_seed.items()},
                      "ctr_by_position": {p: float(np.mean([b[p] for b in by_pos])) for p in by_pos[0]},
                      "seconds": round(time.perf_counter() - t, 1)}
        r = rows[name]["reward_per_impression"]
        print(f"{name:40s} NDCG@10 {off['ndcg@10']:.4f}  reward/impression {r['mean']:+.4f} ± {r['ci95']:.4f}  "
              f"({rows[name]['seconds']} s)", flush=True)
    # Paired by seed (same users, same draws): each policy's reward minus the baseline's.
    base = "popularity" if "popularity" in rows else next(iter(rows))
    for name, row in rows.items():
        diff = np.subtract(row["reward_per_impression"]["per_seed"], rows[base]["reward_per_impression"]["per_seed"])
        row[f"reward_minus_{base}"] = summarize_seeds(diff.tolist())
    report["baseline"] = base
    report["policies"] = rows
    names = list(rows)
    ndcg = [rows[n]["test_ndcg@10"] for n in names]
    reward = [rows[n]["reward_per_impression"]["mean"] for n in names]
    tau = stats.kendalltau(ndcg, reward)
    report["agreement"] = {
        "order_by_ndcg": [names[i] for i in np.argsort(ndcg)[::-1]],
        "order_by_reward": [names[i] for i in np.argsort(reward)[::-1]],
        "kendall_tau": float(tau.statistic), "p_value": float(tau.pvalue),
        "discordant_pairs": [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                             if (rows[a]["test_ndcg@10"] - rows[b]["test_ndcg@10"])
                             * (rows[a]["reward_per_impression"]["mean"] - rows[b]["reward_per_impression"]["mean"]) < 0],
    }
    report["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {args.out} ({report['total_s']} s)")


def print_table(report: dict) -> None:
    base = report["baseline"]
    print(f"| policy | test NDCG@10 | reward / impression (95% CI) | minus {base}, paired (95% CI) | CTR | "
          "purchases / impression | users finding their next item |")
    print("|---|---|---|---|---|---|---|")
    rows = report["policies"]
    for name in sorted(rows, key=lambda n: -rows[n]["test_ndcg@10"]):
        r = rows[name]
        rw, d = r["reward_per_impression"], r[f"reward_minus_{base}"]
        print(f"| {name} | {r['test_ndcg@10']:.4f} | {rw['mean']:+.4f} ± {rw['ci95']:.4f} | "
              f"{d['mean']:+.4f} ± {d['ci95']:.4f} | "
              f"{r['ctr']['mean']:.4f} | {r['purchases_per_impression']['mean']:.4f} | "
              f"{r['users_finding_future']['mean']:.4f} |")
    a = report["agreement"]
    print(f"Kendall tau {a['kendall_tau']:.3f} (p {a['p_value']:.3f}); discordant: {a['discordant_pairs']}")


if __name__ == "__main__":
    main()
