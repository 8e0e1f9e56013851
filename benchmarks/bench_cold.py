"""Cold users on Amazon Beauty: HR@10 and NDCG@10 of every pipeline on the `cold_user` slice beside all (warm)
users, and on users reduced to zero, one or two events.

    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cold.py \
        --data ../shared/data/amazon-beauty --users 1000 --out benchmarks/results/cold_users.json

Leave-one-out split, every part fitted on its training events; fixed random samples of validation and test
users (seed 0); the target is the user's held-out next item, history excluded. Slices:
- all / cold_user: the full history; `cold_user` = the split's users with the fewest training events (20 %).
- 1 event / 2 events: only the last one or two events of the history (a visitor's first clicks).
- 0 events + stated category: no history, the user states one category (the second level of the category path of
  their latest event, e.g. "Skin Care", as the storefront asks); answered online (`recommend_for`), by
  popularity in that segment (ColdStartConfig.segment) or by the dense preference query.
- 0 events: nothing known: the cold list (popularity with exploration slots), the same for every pipeline.
The content weight for one- or two-event users (ColdStartConfig.dense_weight) is chosen on VALIDATION (mean
NDCG@10 over the two slices, the co-occurrence-scored union), and test is reported with it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.candidates.cold import ColdStartConfig
from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate.metrics import hit_rate_at_k, ndcg_at_k, target_ranks
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.rerank import category_key

WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
GENERATIVE = "runs/beauty/generative/model"


def configs(dense: DenseConfig, generative: str | None) -> dict[str, PipelineConfig]:
    union = {"dense": 100, "cooccurrence": 100, "popularity": 50}
    out = {
        "popularity": PipelineConfig(sources={"popularity": 100}, scorer="none", rest="popularity", dense=dense),
        "cooccurrence": PipelineConfig.union({"cooccurrence": 100, "popularity": 50}, model="cooccurrence",
                                             scorer="model", rest="cooccurrence", dense=dense),
        "rag (dense only)": PipelineConfig.rag(k=100, scorer="none", dense=dense),
        "rag + co-occurrence scorer": PipelineConfig.rag(k=100, scorer="model:cooccurrence", dense=dense),
        "pipeline (union, co-occurrence scorer)": PipelineConfig.union(union, model="cooccurrence", scorer="model",
                                                                       rest="cooccurrence", dense=dense),
    }
    if generative:
        out["pipeline (union, generative scorer)"] = PipelineConfig.union(
            {**union, "model": 100}, model="generative", model_dir=generative, scorer="model", rest="model",
            dense=dense)
    return out


def metrics(ranks: np.ndarray) -> dict:
    return {"hr@10": hit_rate_at_k(ranks, 10), "ndcg@10": ndcg_at_k(ranks, 10), "cases": len(ranks)}


def offline(pipe: Pipeline, histories, actions, targets) -> np.ndarray:
    ranks = []
    for s in range(0, len(histories), 256):
        h, a = histories[s:s + 256], actions[s:s + 256]
        ranks.append(target_ranks(pipe.score(h, a), targets[s:s + 256], exclude=h))
    return np.concatenate(ranks)


def online(pipe: Pipeline, contexts: list[dict], targets) -> np.ndarray:
    """Ranks (1-based; above 10 = a miss) of each target in the top 10 answered for an empty history."""
    out = []
    for ctx, t in zip(contexts, targets):
        items = pipe.recommend_for([], None, 10, ctx, seed=0).indices
        out.append(items.index(int(t)) + 1 if int(t) in items else 11)
    return np.asarray(out, dtype=np.int64)


def slices(pipe: Pipeline, cases, cold_mask: np.ndarray, categories: list[str]) -> dict:
    res = {}
    r = offline(pipe, cases.histories, cases.actions, cases.targets)
    res["all"], res["cold_user"] = metrics(r), metrics(r[cold_mask])
    for k in (1, 2):
        res[f"{k} event{'s' if k > 1 else ''}"] = metrics(offline(
            pipe, [h[-k:] for h in cases.histories], [a[-k:] for a in cases.actions], cases.targets))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--users", type=int, default=1000, help="validation and test users sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--generative", default=GENERATIVE, help="saved generative model dir ('' to leave it out)")
    ap.add_argument("--out", default="benchmarks/results/cold_users.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    rng = np.random.default_rng(args.seed)
    picks = {name: np.sort(rng.choice(len(c), min(args.users, len(c)), replace=False))
             for name, c in (("valid", split.valid), ("test", split.test))}
    cases = {"valid": split.valid.subset(picks["valid"]), "test": split.test.subset(picks["test"])}
    cold = {"valid": split.valid_slices["cold_user"][picks["valid"]], "test": split.slices["cold_user"][picks["test"]]}
    paths = ds.catalog.categories

    def stated(c) -> list[dict]:  # the category a visitor states: level 2 of their latest item's path
        out = []
        for h in c.histories:
            key = category_key(paths[int(h[-1])], 2) if len(h) else ""
            out.append({"preferences": {"categories": [key.split(">")[-1].strip()]}} if key else {})
        return out

    dense = DenseConfig(cache_dir=args.cache_dir)
    generative = args.generative if args.generative and Path(args.generative, "recommender.json").exists() else None
    results: dict = {"test": {}, "valid": {}}
    # the content weight for one- or two-event users, on validation
    union_name = "pipeline (union, co-occurrence scorer)"
    base_cfg = configs(dense, None)[union_name]
    pipe = Pipeline(base_cfg).fit(split.train, ds.catalog)
    sweep = {}
    for w in WEIGHTS:
        pipe.cfg = base_cfg.model_copy(update={"cold_start": ColdStartConfig(dense_weight=w)})
        c = cases["valid"]
        sweep[w] = {f"{k} events": metrics(offline(pipe, [h[-k:] for h in c.histories], [a[-k:] for a in c.actions],
                                                   c.targets)) for k in (1, 2)}
        print(f"valid dense_weight {w}: " + ", ".join(f"{k} ndcg@10 {m['ndcg@10']:.4f}" for k, m in sweep[w].items()),
              flush=True)
    best_w = max(WEIGHTS, key=lambda w: np.mean([m["ndcg@10"] for m in sweep[w].values()]))
    results["valid"]["dense_weight_sweep"] = {str(w): v for w, v in sweep.items()}
    print(f"chosen dense_weight {best_w} ({time.perf_counter() - t0:.0f}s)", flush=True)

    for name, cfg in configs(dense, generative).items():
        t1 = time.perf_counter()
        tuned = "dense" in cfg.sources and cfg.scorer != "none"
        variants = {name: cfg}
        if tuned and best_w > 0:
            variants[f"{name}, dense weight {best_w} for 1-2 events"] = cfg.model_copy(
                update={"cold_start": ColdStartConfig(dense_weight=best_w)})
        fitted = Pipeline(cfg).fit(split.train, ds.catalog)
        for vname, vcfg in variants.items():
            fitted.cfg = vcfg
            res = slices(fitted, cases["test"], cold["test"], paths)
            if "dense" in cfg.sources:
                ctx = stated(cases["test"])
                res["0 events + category (dense query)"] = metrics(online(fitted, ctx, cases["test"].targets))
            fitted.cfg = vcfg.model_copy(update={"cold_start": vcfg.cold_start.model_copy(update={"segment": True})})
            res["0 events + category (segment popularity)"] = metrics(online(fitted, stated(cases["test"]),
                                                                              cases["test"].targets))
            fitted.cfg = vcfg
            res["0 events"] = metrics(online(fitted, [{}] * len(cases["test"]), cases["test"].targets))
            results["test"][vname] = res
            print(f"{vname}: " + "; ".join(f"{k} hr {m['hr@10']:.4f} ndcg {m['ndcg@10']:.4f}" for k, m in res.items())
                  + f" ({time.perf_counter() - t1:.0f}s)", flush=True)
    out = {"data": args.data, "split": "leave-one-out, history excluded", "users": args.users, "seed": args.seed,
           "chosen_dense_weight": best_w, "generative": generative, "results": results,
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
