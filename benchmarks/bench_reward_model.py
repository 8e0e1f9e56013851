"""Learned reward model vs a popularity prior vs two heuristics: AUC and log-loss on held-out typed logs.

    OMP_NUM_THREADS=1 flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_reward_model.py \\
        --out benchmarks/results/reward_model.json

Task, per dataset (REES46 multi-category head, Taobao UserBehavior slice): every view is a shown item; its
label is whether the same user carted or bought that item later (`ExampleConfig` defaults: add_to_cart or
purchase, within RewardConfig.window_s = 1 day, longer than either log). Splits (`split_event_log`):
`time` (last 20 % of view times = test, the 15 % before = validation; labels of earlier parts censored at
their cut) and `user` (20 % / 15 % of users, drawn by the seed). Each of 3 seeds refits everything; for the
time split the seed changes only the model's initialisation and batch order, for the user split also the
users drawn. Methods, all fit on the training part only:

- `model`: RewardModel (defaults; all-MiniLM-L6-v2 item text), early stopping on the validation part;
- `prior_rate`: the item's smoothed positive rate (PopularityPrior, strength picked on validation log-loss);
- `prior_count`: how often the item was shown in training, Platt-calibrated (popularity as such);
- `heuristic_history`: history_reward_scores (reward weights of what the user did to the item and to its
  category), Platt-calibrated on training rows for log-loss (AUC does not depend on it);
- `heuristic_content`: content_similarity_scores (max text cosine to the user's history), Platt-calibrated.

Per run, `auc_boot_std` is the bootstrap standard deviation of the test AUC (resampled test rows): the
noise of the test set itself, which the seed spread does not show when the split is fixed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core machine: one thread per benchmark
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dragonrec.data import load_dataset
from dragonrec.embed import HashEmbedder, default_embedder
from dragonrec.reward_model import (
    PlattCalibrator,
    PopularityPrior,
    RewardModel,
    RewardModelConfig,
    auc,
    content_similarity_scores,
    history_reward_scores,
    item_vectors,
    log_loss,
    split_event_log,
)

DATASETS = {  # name -> (directory under --data-root, catalog column used as the item's category)
    "rees46": ("rees46-multicat-head", "category_id"),  # `category` (readable path) is null for 45 % of items
    "taobao": ("taobao-userbehavior-slice", "category"),
}
METHODS = ("model", "prior_rate", "prior_count", "heuristic_history", "heuristic_content")
PRIOR_STRENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def boot_auc_std(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        k = rng.integers(len(y), size=len(y))
        if 0 < y[k].sum() < len(k):
            vals.append(auc(y[k], p[k]))
    return float(np.std(vals))


def run_one(ds, category: str, by: str, seed: int, vectors: np.ndarray, embedder, args) -> dict:
    t0 = time.perf_counter()
    split = split_event_log(ds.events, by=by, valid_frac=args.valid_frac, test_frac=args.test_frac, seed=seed)
    t_split = time.perf_counter() - t0
    train, valid, test = split.train, split.valid, split.test
    y_tr, y_va, y_te = (d["label"].to_numpy() for d in (train, valid, test))
    probs: dict[str, np.ndarray] = {}

    strength = min(PRIOR_STRENGTHS, key=lambda a: log_loss(y_va, PopularityPrior(a).fit(train).predict(valid)))
    probs["prior_rate"] = PopularityPrior(strength).fit(train).predict(test)
    probs["prior_count"] = PopularityPrior(kind="count").fit(train).predict(test)
    for name, score in (("heuristic_history",
                         lambda d: history_reward_scores(d, ds.catalog, category_column=category)),
                        ("heuristic_content", lambda d: content_similarity_scores(d, ds.catalog, vectors))):
        probs[name] = PlattCalibrator().fit(score(train), y_tr).predict(score(test))

    cfg = RewardModelConfig(seed=seed, category_column=category, max_seconds=args.max_seconds,
                            embedding_cache_dir=args.cache_dir)
    t1 = time.perf_counter()
    model = RewardModel(cfg, embedder=embedder).fit(train, ds.catalog, valid=valid)
    t_fit = time.perf_counter() - t1
    probs["model"] = model.predict(test)

    out = {"by": by, "seed": seed, "cuts": split.cuts,
           "n": {"train": len(train), "valid": len(valid), "test": len(test)},
           "positives": {"train": int(y_tr.sum()), "valid": int(y_va.sum()), "test": int(y_te.sum())},
           "prior_strength": strength,
           "model": {"best_step": model.info["best_step"], "steps": model.info["steps"],
                     "best_valid_log_loss": model.info["best_valid_log_loss"], "fit_seconds": round(t_fit, 1)},
           "split_seconds": round(t_split, 1), "metrics": {}}
    for m in METHODS:
        out["metrics"][m] = {"auc": auc(y_te, probs[m]), "log_loss": log_loss(y_te, probs[m]),
                             "auc_boot_std": boot_auc_std(y_te, probs[m], args.n_boot, seed)}
    out["metrics"]["base_rate_log_loss"] = log_loss(y_te, np.full(len(y_te), y_tr.mean()))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def summarize(runs: list[dict]) -> dict:
    """mean, std (ddof=1) and range over seeds of each method's test AUC and log-loss."""
    out = {}
    for m in METHODS:
        out[m] = {}
        for metric in ("auc", "log_loss", "auc_boot_std"):
            v = np.array([r["metrics"][m][metric] for r in runs])
            out[m][metric] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                              "min": float(v.min()), "max": float(v.max())}
    v = np.array([r["metrics"]["base_rate_log_loss"] for r in runs])
    out["base_rate_log_loss"] = {"mean": float(v.mean())}
    return out


def table(results: dict) -> str:
    lines = [("| dataset | split | test rows (positives) | method | AUC mean ± std | AUC bootstrap std |"
              " log-loss mean ± std |"), "|---|---|---|---|---|---|---|"]
    for name, per_split in results["datasets"].items():
        for by, block in per_split.items():
            r0 = block["runs"][0]
            size = f"{r0['n']['test']} ({r0['positives']['test']})" if by == "time" else \
                f"~{r0['n']['test']} (~{r0['positives']['test']})"
            for m in METHODS:
                s = block["summary"][m]
                lines.append(f"| {name} | {by} | {size} | {m} | {s['auc']['mean']:.3f} ± {s['auc']['std']:.3f} | "
                             f"{s['auc_boot_std']['mean']:.3f} | "
                             f"{s['log_loss']['mean']:.4f} ± {s['log_loss']['std']:.4f} |")
            lines.append(f"| {name} | {by} | | base rate | 0.5 | | "
                         f"{block['summary']['base_rate_log_loss']['mean']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    ap.add_argument("--datasets", default="rees46,taobao")
    ap.add_argument("--splits", default="time,user")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--valid-frac", type=float, default=0.15)
    ap.add_argument("--test-frac", type=float, default=0.2)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="training time limit per model fit")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--embedder", choices=("minilm", "hash"), default="minilm",
                    help="item text vectors: all-MiniLM-L6-v2, or the hashing fake (quick runs)")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reward_model.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    embedder = default_embedder() if args.embedder == "minilm" else HashEmbedder(384)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "model_config": RewardModelConfig().model_dump(mode="json"),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "torch": torch.__version__, "threads": torch.get_num_threads()},
                     "datasets": {}}
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        folder, category = DATASETS[name]
        t0 = time.perf_counter()
        ds = load_dataset(args.data_root / folder)
        vectors = item_vectors(ds.catalog, embedder, args.cache_dir)
        print(f"{name}: {len(ds.events)} events, {len(ds.catalog)} items, text vectors in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        results["datasets"][name] = {}
        for by in args.splits.split(","):
            runs = []
            for seed in seeds:
                r = run_one(ds, category, by, seed, vectors, embedder, args)
                runs.append(r)
                print(f"  {by} seed {seed}: " + ", ".join(
                    f"{m} AUC {r['metrics'][m]['auc']:.3f} LL {r['metrics'][m]['log_loss']:.4f}" for m in METHODS)
                    + f" ({r['seconds']} s; test {r['n']['test']} rows, {r['positives']['test']} positive)",
                    flush=True)
            results["datasets"][name][by] = {"runs": runs, "summary": summarize(runs)}
        results["datasets"][name]["seconds"] = round(time.perf_counter() - t0, 1)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table({"datasets": {k: {b: v for b, v in d.items() if b != "seconds"}
                              for k, d in results["datasets"].items()}}))
    print(f"wrote {args.out} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
