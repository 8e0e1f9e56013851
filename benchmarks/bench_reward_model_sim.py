"""The learned reward model on held-out simulated logs (Amazon Beauty through the simulator).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reward_model_sim.py --users 6000 --seeds 0 1 2 \
        --out benchmarks/results/reward_model_sim.json

Logs: the simulator's users (leave-one-out test cut) served by co-occurrence, epsilon-greedy over its top 50
(epsilon 0.2), so lists mix good and arbitrary items and every slot has a position; one row per shown slot
(`reward_model.examples_from_impressions`: label = a positive action with reward > 0). Split by user (the
held-out users' slots are never trained on). Compared: the reward model, the item's smoothed positive rate
and its count (popularity priors), the click-through of the slot's position in training (a position prior:
the simulator's examination bias is the first thing any model must learn), and the two heuristics of
bench_reward_model.py (history reward, content similarity), each calibrated on training rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate.off_policy import EpsilonGreedyPolicy
from dragonrec.evaluate.simulator import Simulator, summarize_seeds, users_from_split
from dragonrec.recommenders import build
from dragonrec.recommenders.sequential import item_text_embeddings
from dragonrec.reward_model import (
    PlattCalibrator,
    PopularityPrior,
    RewardModel,
    RewardModelConfig,
    auc,
    content_similarity_scores,
    examples_from_impressions,
    history_reward_scores,
    log_loss,
    split_examples,
)

PRIOR_STRENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
METHODS = ("model", "prior_rate", "prior_count", "position_prior", "heuristic_history", "heuristic_content")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--out", default="benchmarks/results/reward_model_sim.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    vectors = item_text_embeddings(ds.catalog, args.cache_dir)
    sim = Simulator(ds.catalog, split.train, item_vectors=vectors)
    users = users_from_split(split, start="test")
    cooc = build("cooccurrence").fit(split.train, ds.catalog)
    history = split.train[["user_id", "item_id", "action", "timestamp"]]
    runs = []
    for seed in args.seeds:
        t = time.perf_counter()
        pick = np.random.default_rng(seed).choice(len(users), args.users, replace=False)
        log = sim.run(EpsilonGreedyPolicy(cooc, epsilon=args.epsilon, pool=50, seed=seed), [users[i] for i in pick],
                      seed=seed)
        events = log.events
        all_events = pd.concat([history, events[["user_id", "item_id", "action", "timestamp", "request_id"]]],
                               ignore_index=True)
        ex = examples_from_impressions(log.impressions, all_events)
        sp = split_examples(ex, by="user", valid_frac=0.15, test_frac=0.2, seed=seed)
        tr, va, te = sp.train, sp.valid, sp.test
        y_tr, y_te = tr["label"].to_numpy(), te["label"].to_numpy()
        y_va = va["label"].to_numpy()
        # the prior's smoothing strength chosen on validation, as bench_reward_model.py does
        strength = min(PRIOR_STRENGTHS, key=lambda a: log_loss(y_va, PopularityPrior(a).fit(tr).predict(va)))
        probs = {"prior_rate": PopularityPrior(strength).fit(tr).predict(te),
                 "prior_count": PopularityPrior(kind="count").fit(tr).predict(te)}
        ctr = pd.Series(y_tr).groupby(tr["position"].to_numpy()).mean()
        probs["position_prior"] = ctr.reindex(te["position"].to_numpy()).fillna(y_tr.mean()).to_numpy()
        for name, score in (("heuristic_history", lambda d: history_reward_scores(d, ds.catalog)),
                            ("heuristic_content", lambda d: content_similarity_scores(d, ds.catalog, vectors))):
            probs[name] = PlattCalibrator().fit(score(tr), y_tr).predict(score(te))
        model = RewardModel(RewardModelConfig(seed=seed, max_seconds=args.max_seconds,
                                              embedding_cache_dir=args.cache_dir)).fit(tr, ds.catalog, valid=va)
        probs["model"] = model.predict(te)
        run = {"seed": seed, "prior_strength": strength, "rows": {"train": len(tr), "valid": len(va), "test": len(te)},
               "positives": {"train": int(y_tr.sum()), "test": int(y_te.sum())},
               "metrics": {m: {"auc": auc(y_te, probs[m]), "log_loss": log_loss(y_te, probs[m])} for m in METHODS},
               "base_rate_log_loss": log_loss(y_te, np.full(len(y_te), y_tr.mean())),
               "seconds": round(time.perf_counter() - t, 1)}
        runs.append(run)
        print(json.dumps({m: round(v["auc"], 4) for m, v in run["metrics"].items()}), run["rows"], run["positives"],
              flush=True)
    summary = {m: {k: summarize_seeds([r["metrics"][m][k] for r in runs]) for k in ("auc", "log_loss")}
               for m in METHODS}
    report = {"command": " ".join(["benchmarks/bench_reward_model_sim.py", *sys.argv[1:]]), "runs": runs,
              "summary": summary, "total_s": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print("| method | AUC (mean ± std over seeds) | log-loss |")
    print("|---|---|---|")
    for m in METHODS:
        a, ll = summary[m]["auc"], summary[m]["log_loss"]
        print(f"| {m} | {a['mean']:.3f} ± {a['std']:.3f} | {ll['mean']:.4f} ± {ll['std']:.4f} |")
    print(f"wrote {args.out} ({report['total_s']} s)")


if __name__ == "__main__":
    main()
