"""The diversity knob's trade-off: accuracy against intra-list diversity and coverage as the re-ranker moves.

    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank.py \
        --data ../shared/data/amazon-beauty --users 3000 --out benchmarks/results/rerank.json \
        --plot docs/img/diversity_tradeoff.png

A co-occurrence pipeline (co-occurrence + popularity candidates, scored by co-occurrence) is fitted once on the
leave-one-out training part, or (`--model generative --model-dir DIR`) a saved generative model trained on that
part (`dragonrec train sft ... --set refit_with_valid=false`, so that validation stays held out) proposes its own
top --pool candidates and scores them; each setting's DiversityReranker re-ranks the same scored candidate
lists of fixed random samples of validation and test users (history excluded; the pipeline runs once,
`Recorder`). Item vectors are the dense source's MiniLM text embeddings (cached under --cache-dir). The fixed
settings in SETTINGS are reported as they are; the sweep
(mode x novelty x diversity knob) is run on both splits, the setting that comes closest to the goal (NDCG@10
loss <= 2 %, embedding ILD +25 %, catalog coverage +50 %) is chosen on VALIDATION only, and test is reported.
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

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import leave_one_out, load_dataset
from dragonrec.embed import embed_catalog
from dragonrec.evaluate.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    ndcg_at_k,
)
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.rerank import DiversityReranker, RerankConfig, Reranker, category_key

SETTINGS: dict[str, RerankConfig | None] = {
    "none": None,
    "diversity=0": RerankConfig(diversity=0.0, exclude_bought=False),
    "diversity=0.1": RerankConfig(diversity=0.1, exclude_bought=False),
    "diversity=0.3": RerankConfig(diversity=0.3, exclude_bought=False),
    "diversity=0.5": RerankConfig(diversity=0.5, exclude_bought=False),
    "cap=3": RerankConfig(category_cap=3, exclude_bought=False),
    "cap=3 (depth 2)": RerankConfig(category_cap=3, category_depth=2, exclude_bought=False),
    "diversity=0.3+cap=3": RerankConfig(diversity=0.3, category_cap=3, exclude_bought=False),
    "calibration=0.5": RerankConfig(calibration=0.5, exclude_bought=False),
}


KNOB = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
# The novelty weight beside the similarity term (both scaled by the knob): 0 = plain MMR / DPP.
FAMILIES = {"mmr": ("mmr", 0.0), "mmr+novelty 1": ("mmr", 1.0), "mmr+novelty 3": ("mmr", 3.0),
            "dpp": ("dpp", 0.0), "dpp+novelty 1": ("dpp", 1.0)}
# A model's log-scale scores can enter as probabilities (RerankConfig.relevance): families prefixed "p-". Their
# relevance is a probability against a uniform guess (1), unbounded above, so the knob needs to go higher.
PROBABILITY_FAMILIES = {f"p-{k}": v for k, v in FAMILIES.items()}
KNOB_P = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


GOAL = {"ndcg@10": -0.02, "ild_embedding": 0.25, "catalog_coverage": 0.50}


def knob(family: str) -> tuple[float, ...]:
    return KNOB_P if family.startswith("p-") else KNOB


def families(model: str) -> dict[str, tuple[str, float]]:
    return FAMILIES if model == "cooccurrence" else {**FAMILIES, **PROBABILITY_FAMILIES}


def sweep(model: str) -> dict[str, RerankConfig]:
    return {f"{fam} d={d}": RerankConfig(diversity=d, mode=mode, novelty=nov, exclude_bought=False,
                                         relevance="probability" if fam.startswith("p-") else "minmax")
            for fam, (mode, nov) in families(model).items() for d in knob(fam)}


def relative(m: dict, base: dict) -> dict:
    return {k: (m[k] / base[k] - 1.0) if base[k] else None
            for k in ("ndcg@10", "hr@10", "ild_category", "ild_embedding", "catalog_coverage", "category_coverage")}


def closeness(vs: dict) -> float:
    """How far toward the goal a setting gets: min over ILD and coverage of gain / goal, -inf when it loses
    more than 2 % NDCG@10."""
    if vs["ndcg@10"] < GOAL["ndcg@10"]:
        return float("-inf")
    return min(vs["ild_embedding"] / GOAL["ild_embedding"], vs["catalog_coverage"] / GOAL["catalog_coverage"])


def plot(results: dict, path: str, title: str, fams: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["none"]
    panels = (("ild_embedding", "intra-list diversity (embedding)"), ("ild_category", "intra-list diversity (category)"),
              ("category_coverage", "category coverage"), ("catalog_coverage", "catalog coverage"))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), sharey=True)
    for ax, (key, label) in zip(axes, panels):
        for fam in fams:
            pts = [results[f"{fam} d={d}"] for d in knob(fam)]
            xs, ys = [base[key]] + [p[key] for p in pts], [base["ndcg@10"]] + [p["ndcg@10"] for p in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=fam, ls="--" if fam.startswith("p-") else "-")
        ax.axhline(base["ndcg@10"] * 0.98, color="grey", ls="--", lw=0.8)
        ax.scatter([base[key]], [base["ndcg@10"]], color="black", zorder=5, label="no re-rank")
        if key in GOAL:
            ax.axvline(base[key] * (1 + GOAL[key]), color="red", ls=":", lw=0.8)
        ax.set_xlabel(label)
    axes[0].set_ylabel("NDCG@10 (test)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: the diversity knob from 0 (black) up; dashed: -2 % NDCG@10, dotted red: the goal",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


class Recorder(Reranker):
    """The plain re-ranker (drops banned items) that keeps what each list's re-rank stage was given, so that every
    setting re-ranks the same scored candidates without running the pipeline (and its model) again."""

    def __init__(self):
        self.calls: list[tuple] = []

    def rerank_for(self, items, scores, banned, request):
        self.calls.append((items, scores, banned, request))
        return super().rerank_for(items, scores, banned, request)


def record(pipe: Pipeline, cases) -> list[tuple]:
    """What the re-rank stage gets for each case: (items, scores, banned, request), in case order."""
    pipe.reranker = rec = Recorder()
    for start in range(0, len(cases), 256):
        hist, acts = cases.histories[start:start + 256], cases.actions[start:start + 256]
        before = len(rec.calls)
        pipe.score(hist, acts)
        if len(rec.calls) - before != len(hist):  # a cold-start list skips the re-rank stage
            raise RuntimeError(f"{len(rec.calls) - before} re-ranked lists for {len(hist)} cases")
    return rec.calls


def measure(reranker: Reranker, calls: list[tuple], targets: np.ndarray, vectors: np.ndarray,
            categories: np.ndarray, top_cats: np.ndarray, n: int = 10) -> dict:
    t0 = time.perf_counter()
    ranks, lists = np.full(len(calls), n, dtype=np.int64), []
    for c, (items, scores, banned, request) in enumerate(calls):
        top = items[reranker.rerank_for(items, scores, banned, request)][:n]
        hit = np.flatnonzero(top == targets[c])
        if len(hit):
            ranks[c] = hit[0]
        lists.append(top.tolist())
    return {
        "ndcg@10": ndcg_at_k(ranks, 10), "hr@10": hit_rate_at_k(ranks, 10),
        "ild_category": intra_list_diversity(lists, categories=categories),
        "ild_category_depth2": intra_list_diversity(lists, categories=top_cats),
        "ild_embedding": intra_list_diversity(lists, embeddings=vectors),
        "catalog_coverage": catalog_coverage(lists, len(categories)),
        "category_coverage": len({categories[i] for lst in lists for i in lst if categories[i]})
        / max(len({c for c in categories if c}), 1),
        "cases": len(ranks), "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--users", type=int, default=3000, help="test (and validation) users sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=300, help="candidates per request (the model's own, or co-occurrence)")
    ap.add_argument("--model", default="cooccurrence", choices=("cooccurrence", "generative"),
                    help="the pipeline whose lists are re-ranked")
    ap.add_argument("--model-dir", default=None,
                    help="a saved model of --model trained on the leave-one-out training part (generative)")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--out", default="benchmarks/results/rerank.json")
    ap.add_argument("--plot", default="docs/img/diversity_tradeoff.png")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ds = load_dataset(args.data)
    split = leave_one_out(ds.events)
    rng = np.random.default_rng(args.seed)
    samples = {name: cases.subset(np.sort(rng.choice(len(cases), min(args.users, len(cases)), replace=False)))
               for name, cases in (("valid", split.valid), ("test", split.test))}
    dense = DenseConfig(cache_dir=args.cache_dir)
    vectors = embed_catalog(ds.catalog, cache_dir=args.cache_dir, template=dense.template)
    if args.model == "cooccurrence":
        cfg = PipelineConfig.union({"cooccurrence": args.pool, "popularity": 50}, model="cooccurrence",
                                   scorer="model", rest="cooccurrence", dense=dense)
    else:
        if not args.model_dir:
            raise SystemExit("--model generative needs --model-dir (a model trained on the training part only)")
        cfg = PipelineConfig.union({"model": args.pool}, model=args.model, model_dir=args.model_dir, scorer="model",
                                   rest="model", dense=dense)
    pipe = Pipeline(cfg).fit(split.train, ds.catalog)
    calls = {part: record(pipe, cases) for part, cases in samples.items()}
    print(f"fitted and scored in {time.perf_counter() - t0:.0f}s; {len(samples['test'])} users per split", flush=True)
    categories = ds.catalog.categories
    top_cats = np.asarray([category_key(c, 2) for c in categories], dtype=object)
    settings = {**SETTINGS, **sweep(args.model)}
    results: dict[str, dict] = {"valid": {}, "test": {}}
    for name, rc in settings.items():
        reranker = (Reranker() if rc is None
                    else DiversityReranker(rc).fit(ds.catalog, vectors, popularity=pipe.cold.popularity))
        for part, cases in samples.items():
            m = results[part][name] = {"config": None if rc is None else rc.model_dump(include={
                "diversity", "mode", "relevance", "novelty", "category_cap", "category_depth", "calibration"}),
                **measure(reranker, calls[part], cases.targets, vectors, categories, top_cats)}
        m = results["test"][name]
        print(f"{name:22s} test ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f} ild_cat {m['ild_category']:.3f} "
              f"ild_emb {m['ild_embedding']:.3f} cov {m['catalog_coverage']:.3f} ({m['seconds']}s)", flush=True)
    for part_results in results.values():
        base = part_results["none"]
        for m in part_results.values():
            m["vs_none"] = relative(m, base)
    chosen = max(sweep(args.model), key=lambda k: closeness(results["valid"][k]["vs_none"]))
    reached = {k: results["test"][chosen]["vs_none"][k] >= g for k, g in GOAL.items()}
    print(f"chosen on validation: {chosen}; test vs none: "
          + ", ".join(f"{k} {v:+.1%}" for k, v in results["test"][chosen]["vs_none"].items() if v is not None)
          + f"; goal reached: {all(reached.values())} {reached}", flush=True)
    out = {"data": args.data, "split": "loo valid and test, history excluded", "users": len(samples["test"]),
           "model": args.model, "model_dir": args.model_dir,
           "seed": args.seed, "pipeline": cfg.model_dump(exclude={"rerank"}),
           "item_vectors": "all-MiniLM-L6-v2, dense template", "goal": GOAL,
           "chosen_on_valid": chosen, "goal_reached_on_test": reached,
           "results": results["test"], "valid_results": results["valid"],
           "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if args.plot:
        plot(results["test"], args.plot, title=f"Amazon Beauty, {args.model} pipeline", fams=families(args.model))
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
