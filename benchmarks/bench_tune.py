"""Tuned against default, over seeds: evaluate a `dragonrec tune` configuration with other seeds, and summarise.

The search and the seed-0 tuned model come from the command line itself; the default from `dragonrec evaluate`:

    L="flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=2"
    $L .venv/bin/dragonrec tune --data /work/shared/data/ml-100k --out runs/tune13/generative \
        --recommender generative --trials 15 --minutes 12 --quiet            # search + final model (seed 0)
    $L .venv/bin/python benchmarks/bench_tune.py eval --tuned runs/tune13/generative/tuned_config.json \
        --seed 1 --output runs/tune13/generative/tuned_s1.json                  # the tuned config, seed 1
    $L .venv/bin/dragonrec evaluate --data /work/shared/data/ml-100k --recommender generative --seed 1 \
        --quiet --output runs/tune13/defaults/generative_s1.json                # the default, seed 1
    .venv/bin/python benchmarks/bench_tune.py summary --tuned-config runs/tune13/generative/tuned_config.json \
        --tuned 'runs/tune13/generative/report.json' 'runs/tune13/generative/tuned_s*.json' \
        --defaults 'runs/tune13/defaults/generative_s*.json' --out benchmarks/results/tune_ml100k_generative.json

Every final model is fitted as the recommender's default is (early stopping on validation, refit on train +
validation targets) and scored once on test; the search itself never reads test.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np


def compact(report: dict) -> dict:
    train = report.get("train") or {}
    return {"seed": report["split"]["seed"], "test_ndcg@10": report["test"]["ndcg@10"],
            "test_hr@10": report["test"]["hr@10"], "fit_seconds": report["fit_seconds"],
            "best_valid_ndcg@10": train.get("best_valid_ndcg@10"), "best_epoch": train.get("best_epoch")}


def spread(runs: list[dict]) -> dict:
    """Mean, sample standard deviation and range of the test metrics over seeds."""
    out = {}
    for key in ("test_ndcg@10", "test_hr@10"):
        v = np.array([r[key] for r in runs])
        out[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max()), "n": len(v)}
    return out


def evaluate_tuned(args) -> None:
    from dragonrec.evaluate.experiment import run_evaluation
    from dragonrec.tune import load_tuned

    saved = json.loads(Path(args.tuned).read_text())
    name, overrides = load_tuned(args.tuned)
    report = run_evaluation(saved["data"], name, split=saved["split"], overrides=overrides, seed=args.seed,
                            ties=saved["ties"], quiet=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=float))
    print(f"{name} tuned, seed {args.seed}: test ndcg@10 {report['test']['ndcg@10']:.4f} "
          f"hr@10 {report['test']['hr@10']:.4f} ({report['fit_seconds']:.0f} s fit)")


def summary(args) -> None:
    """Without --tuned-config: the default configuration's seeds only (no search was run)."""
    files = {name: sorted({f for pattern in patterns for f in glob.glob(pattern)})
             for name, patterns in (("default", args.defaults), ("tuned", args.tuned or []))}
    if args.tuned_config:
        tuned_cfg = json.loads(Path(args.tuned_config).read_text())
        out = {"data": tuned_cfg["dataset"], "recommender": tuned_cfg["recommender"], "split": tuned_cfg["split"],
               "ties": tuned_cfg["ties"],
               "search": {k: tuned_cfg.get(k) for k in ("seconds", "stopped", "best_trial", "best_value",
                                                        "best_params", "guard", "fixed", "space", "tune", "trials")}}
    else:
        first = json.loads(Path(files["default"][0]).read_text())
        out = {"data": first["dataset"], "recommender": first["recommender"], "split": first["split"]["name"],
               "ties": first["split"]["ties"], "search": None}
    for name, paths in files.items():
        runs = [{**compact(json.loads(Path(p).read_text())), "report": p} for p in paths]
        out[name] = {"runs": runs, **(spread(runs) if runs else {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))
    for name in ("default", "tuned"):
        m = out[name]
        if "test_ndcg@10" in m:
            print(f"{out['recommender']} {name}: test ndcg@10 {m['test_ndcg@10']['mean']:.4f} ± "
                  f"{m['test_ndcg@10']['std']:.4f} hr@10 {m['test_hr@10']['mean']:.4f} ± "
                  f"{m['test_hr@10']['std']:.4f} over {m['test_ndcg@10']['n']} seeds")
    if args.tuned_config:
        print(f"search: {len(tuned_cfg['trials'])} trials in {tuned_cfg['seconds'] / 60:.1f} min, "
              f"best valid ndcg@10 {tuned_cfg['best_value']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="fit and evaluate a tuned configuration with one seed")
    ev.add_argument("--tuned", required=True, help="a tuned_config.json from `dragonrec tune`")
    ev.add_argument("--seed", type=int, required=True)
    ev.add_argument("--output", type=Path, required=True)
    su = sub.add_parser("summary", help="mean and spread of default and tuned reports")
    su.add_argument("--tuned-config", default=None, help="the search's tuned_config.json (none: defaults only)")
    su.add_argument("--tuned", nargs="+", default=None, help="globs of reports of the tuned configuration")
    su.add_argument("--defaults", nargs="+", required=True, help="globs of reports of the default configuration")
    su.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    evaluate_tuned(args) if args.cmd == "eval" else summary(args)


if __name__ == "__main__":
    main()
