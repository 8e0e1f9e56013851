"""Benchmark of the sequence recommenders (sasrec / generative) on a dataset with leave-one-out.

    flock /tmp/dragonrec-cpu.lock .venv/bin/python benchmarks/bench_sequential.py \
        --data /work/shared/data/amazon-beauty --model sasrec --out benchmarks/results/sasrec_beauty.json

Prints and writes JSON: valid/test NDCG@10 and HR@10 (history excluded and kept), training wall time,
samples/s, minutes to the best epoch, inference users/s (full ranking) and single-request latency.
`--final-with-valid` then retrains on train + the validation targets for the epochs chosen on validation
(no early stopping, never looks at test) and reports that model's test metrics too. `--split cold-item`
holds 5% of items out of training and reports HR@10 on the test cases whose target is such a cold item; a model
with a cold head (`--set cold_head=true`) is also evaluated with the head switched off (`cold_head_off`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from dragonrec.data import cold_item_split, leave_one_out, load_dataset
from dragonrec.evaluate import evaluate_split
from dragonrec.recommenders.sequential import (
    GenerativeRecommender,
    SequentialConfig,
    SequentialRecommender,
)

MODELS = {"sasrec": SequentialRecommender, "generative": GenerativeRecommender}


def parse_sets(pairs: list[str]) -> dict:
    """key=value pairs -> dict, values parsed as JSON when they parse (numbers, true/false, null)."""
    out = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def summarize(res: dict) -> dict:
    keep = ("ndcg@10", "hr@10", "ndcg@5", "hr@5", "cases")
    out = {"excluded": {k: res["metrics"][k] for k in keep}, "kept": {k: res["keep_history"][k] for k in keep}}
    for name in ("cold_item", "cold_user", "same_day"):
        if name in res["slices"]:
            out[name] = {k: res["slices"][name][k] for k in keep}
    return out


def timing(model, cases, n_single: int = 200) -> dict:
    t0 = time.perf_counter()
    for s in range(0, len(cases), 512):
        scores = model.score(cases.histories[s:s + 512], cases.actions[s:s + 512])
        np.argpartition(-scores, 10, axis=1)[:, :10]
    full = len(cases) / (time.perf_counter() - t0)
    lat = []
    for i in range(min(n_single, len(cases))):
        t1 = time.perf_counter()
        model.recommend(cases.histories[i], n=10, actions=cases.actions[i])
        lat.append(1000 * (time.perf_counter() - t1))
    return {"users_per_s_full_ranking": full, "single_ms_p50": float(np.median(lat)),
            "single_ms_p95": float(np.percentile(lat, 95))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/shared/data/amazon-beauty")
    ap.add_argument("--model", choices=list(MODELS), default="sasrec")
    ap.add_argument("--split", choices=["loo", "cold-item"], default="loo")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. hidden_size=64 lr=0.002")
    ap.add_argument("--final-with-valid", action="store_true", help="also retrain on train+valid targets")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--save", type=Path, default=None, help="save the (validation-selected) model here")
    args = ap.parse_args()

    ds = load_dataset(args.data)
    split = leave_one_out(ds.events) if args.split == "loo" else cold_item_split(ds.events)
    cls = MODELS[args.model]
    # The early-stopped model first (refit off); --final-with-valid then refits it as `refit_with_valid` would.
    cfg = SequentialConfig(**{**cls.default_config, "refit_with_valid": False, **parse_sets(args.set)})
    t0 = time.perf_counter()
    model = cls(cfg).fit(split.train, ds.catalog, valid=split.valid)
    fit_s = time.perf_counter() - t0
    res = evaluate_split(model, split)
    r = model.result
    report = {
        "data": ds.name, "model": args.model, "split": split.name, "config": model.cfg.model_dump(),
        "valid": summarize(res["valid"]), "test": summarize(res["test"]),
        "train": {"fit_s": fit_s, "epochs": r.epochs, "best_epoch": r.best_epoch, "stopped": r.stopped,
                  "minutes_to_best": r.seconds_to_best / 60, "samples_per_s": r.samples_per_s, "seconds": r.seconds},
        "inference": timing(model, split.test),
        "history": r.history,
    }
    if getattr(model.model, "cold_ready", False):
        # the same model with its cold head switched off: cold items scored by the main path, as before the head
        offset = float(model.model.cold_offset)
        model.model.cold_offset.fill_(float("-inf"))
        report["cold_head_off"] = {"test": summarize(evaluate_split(model, split)["test"])}
        model.model.cold_offset.fill_(offset)
        report["cold_calibration"] = {k: v for k, v in model.cold_calibration.items() if k != "curve"}
    if args.save:
        model.save(args.save)
    if args.final_with_valid:
        # The recommender's own refit: train + each user's validation target, epochs fixed from above.
        t1 = time.perf_counter()
        model.refit(split.train, ds.catalog, split.valid)
        res2 = evaluate_split(model, split)
        report["final_with_valid"] = {"test": summarize(res2["test"]), "fit_s": time.perf_counter() - t1,
                                      "epochs": max(r.best_epoch, 1)}
    text = json.dumps(report, indent=2, default=float)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2, default=float))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
