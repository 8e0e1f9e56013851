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

Two models on the same split, case by case (each case's NDCG@10 averaged over the seeds of each model; the
standard error of the mean paired difference is the noise of the cases themselves, which seeds cannot average
away):

    .venv/bin/python benchmarks/bench_tune.py paired --a 'runs/ml100k/sasrec_s*.json' \
        --b 'runs/ml100k/generative_s*.json' --out benchmarks/results/paired_ml-100k.json

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


def _identity(summary: dict) -> tuple:
    """(dataset, recommender, split, ties) of a summary, from a search's config (names) or reports (a dict)."""
    data = summary["data"]["name"] if isinstance(summary["data"], dict) else summary["data"]
    split = {"loo": "leave-one-out"}.get(summary["split"], summary["split"])
    return data, summary["recommender"], split, summary["ties"]


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
    earlier = json.loads(args.merge.read_text()) if args.merge else None
    if earlier is not None:
        mine, theirs = _identity(out), _identity(earlier)
        if mine != theirs:
            raise SystemExit(f"--merge: {args.merge} is of {theirs}, these reports of {mine}")
        if out["search"] is None:
            out["search"] = earlier.get("search")
    for name, paths in files.items():
        runs = [{**compact(json.loads(Path(p).read_text())), "report": p} for p in paths]
        if earlier is not None:  # the earlier summary's seeds that no report given here replaces
            seeds = {r["seed"] for r in runs}
            runs = sorted([r for r in earlier.get(name, {}).get("runs", []) if r["seed"] not in seeds] + runs,
                          key=lambda r: r["seed"])
        out[name] = {"runs": runs, **(spread(runs) if runs else {})}
    if out["search"] and out["search"].get("best_trial") == 0 and not out["tuned"]["runs"]:
        # the search kept the default (trial 0): the tuned configuration is the default one, and so are its fits
        out["tuned"] = {**out["default"], "same_as_default": True}
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


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], k: int = 10) -> dict:
    """B against A from per-case target ranks (one array per seed, the same cases in the same order): the mean
    over cases of (B's NDCG@k averaged over its seeds - A's), its standard error and 95 % interval."""
    from dragonrec.evaluate.metrics import ndcg_gains

    ga = np.mean([ndcg_gains(r, k) for r in a], axis=0)
    gb = np.mean([ndcg_gains(r, k) for r in b], axis=0)
    d = gb - ga
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    mean = float(d.mean())
    return {f"a_ndcg@{k}": float(ga.mean()), f"b_ndcg@{k}": float(gb.mean()), "difference": mean, "se": se,
            "ci95": [mean - 1.96 * se, mean + 1.96 * se], "relative": mean / float(ga.mean()) if ga.mean() else None,
            "z": mean / se if se > 0 else None, "cases": len(d), "seeds": [len(a), len(b)],
            "cases_where_b_better": int((d > 0).sum()), "cases_where_a_better": int((d < 0).sum())}


def paired(args) -> None:
    sides = {}
    for side, patterns in (("a", args.a), ("b", args.b)):
        paths = sorted({f for pattern in patterns for f in glob.glob(pattern)})
        if not paths:
            raise SystemExit(f"--{side}: no report matches {patterns}")
        sides[side] = [json.loads(Path(p).read_text()) | {"_path": p} for p in paths]
    key = f"{args.part}_ranks"
    reports = sides["a"] + sides["b"]
    missing = [r["_path"] for r in reports if key not in r]
    if missing:
        raise SystemExit(f"no per-case ranks ({key}) in {missing}: rerun them with this version of dragonrec")
    splits = {(r["dataset"]["name"], r["split"]["name"], r["split"]["ties"], len(r[key])) for r in reports}
    if len(splits) != 1:
        raise SystemExit(f"the reports are not on one split: {sorted(splits)}")
    if next(iter(splits))[2] != "keep":  # shuffled ties: each seed has its own split, pair seed with seed
        seeds = [sorted(r["split"]["seed"] for r in sides[s]) for s in "ab"]
        if seeds[0] != seeds[1]:
            raise SystemExit(f"shuffled ties: the two sides need the same seeds (one split each), got {seeds}")
    res = paired_difference([np.asarray(r[key]) for r in sides["a"]], [np.asarray(r[key]) for r in sides["b"]])
    out = {"data": reports[0]["dataset"]["name"], "split": reports[0]["split"]["name"],
           "ties": reports[0]["split"]["ties"], "part": args.part,
           "a": {"recommender": sides["a"][0]["recommender"], "reports": [r["_path"] for r in sides["a"]]},
           "b": {"recommender": sides["b"][0]["recommender"], "reports": [r["_path"] for r in sides["b"]]}, **res}
    print(f"{out['data']} {args.part}: {out['b']['recommender']} - {out['a']['recommender']} NDCG@10 "
          f"{res['difference']:+.4f} (SE {res['se']:.4f}, 95 % {res['ci95'][0]:+.4f}..{res['ci95'][1]:+.4f}, "
          f"{res['relative']:+.1%} of {res['a_ndcg@10']:.4f}) over {res['cases']} cases, seeds {res['seeds']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


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
    su.add_argument("--merge", type=Path, default=None,
                    help="an earlier summary of the same model, data and split: its seeds that no report given here "
                         "replaces are kept (reports live in runs/, which is not kept across machines)")
    su.add_argument("--out", type=Path, required=True)
    pa = sub.add_parser("paired", help="B against A case by case on the same split")
    pa.add_argument("--a", nargs="+", required=True, help="globs of A's reports (one per seed)")
    pa.add_argument("--b", nargs="+", required=True, help="globs of B's reports (one per seed)")
    pa.add_argument("--part", default="test", choices=("test", "valid"))
    pa.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    {"eval": evaluate_tuned, "summary": summary, "paired": paired}[args.cmd](args)


if __name__ == "__main__":
    main()
