"""One evaluation run end to end: read a dataset, split it, fit (or load) a recommender, rank, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from dragonrec.data import cold_item_split, leave_one_out, load_dataset, shuffle_ties, time_split
from dragonrec.data.provenance import Provenance, check_held_out, trained_keys
from dragonrec.evaluate.runner import evaluate_cases
from dragonrec.progress import log, progress_bar
from dragonrec.recommenders import build, recommender_class

TIES = ("keep", "shuffle")

# What `dragonrec demo` evaluates before it trains the generative model, cheapest first, with its settings.
DEMO_RECOMMENDERS: dict[str, dict] = {
    "popularity": {},
    "cooccurrence": {},
    "rag": {"k": 500, "scorer": "model:cooccurrence", "cache_dir": ".cache/embeddings",
            "query": {"half_life": 0.5, "max_history": 5}},
    "sasrec": {"progress": False},
}


def make_split(events, split: str, seed: int = 0):
    if split == "loo":
        return leave_one_out(events)
    if split == "time":
        return time_split(events)
    if split == "cold-item":
        return cold_item_split(events, seed=seed)
    raise ValueError(f"unknown split {split!r} (loo, time, cold-item)")


def saved_recommender_name(model_dir: Path) -> str:
    """The recommender a saved model directory holds (from its recommender.json)."""
    meta = Path(model_dir) / "recommender.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: {model_dir} is not a saved dragonrec model")
    return json.loads(meta.read_text())["name"]


def run_evaluation(data: Path | str, recommender: str | None, *, model_dir: Path | None = None, split: str = "loo",
                   overrides: dict | None = None, on_error: str = "raise", seed: int = 0, ties: str = "keep",
                   save_to: Path | None = None, console: Console | None = None, quiet: bool = False,
                   model=None) -> dict:
    """Evaluate one recommender on one dataset; returns the JSON-ready report.

    `ties="shuffle"` puts every run of same-timestamp events of a user in a seeded random order before the
    split (training and evaluation alike). A saved model (`model_dir`) is refused when the split's test
    targets may be events it trained on (`dragonrec.data.provenance`). `model` evaluates an already built,
    unfitted recommender object instead of building one by name.

    `report["test"]` holds the headline metrics (history items excluded from the ranking);
    `test_keep_history` the same with them kept; `test_slices` the cold-user, same-day (and cold-item)
    slices; `test_beyond` coverage, diversity and novelty of the top-10 lists; `test_degradation` how many
    requests a failing scorer sent back to retrieval order, and why.
    """
    console = console or Console(stderr=True)
    if ties not in TIES:
        raise ValueError(f"unknown ties {ties!r} (keep, shuffle)")
    if recommender is None and model is None:
        if model_dir is None:
            raise ValueError("name a recommender or a saved model directory")
        recommender = saved_recommender_name(model_dir)
    recommender = recommender or getattr(model, "name", type(model).__name__)
    t0 = time.perf_counter()
    dataset = load_dataset(data, on_error=on_error)
    events = shuffle_ties(dataset.events, seed) if ties == "shuffle" else dataset.events
    sp = make_split(events, split, seed=seed)
    log(console, f"{dataset.name}: {dataset.counts()} | split {sp.name}, ties {ties}: {len(sp.train)} training "
                 f"events, {len(sp.valid)} validation and {len(sp.test)} test cases", quiet)
    t_fit = time.perf_counter()
    def check_saved(directory) -> None:
        prov = Provenance.load(directory)
        here = Provenance.of(dataset, sp, split_name=split, seed=seed, ties=ties, config={}, events=events)
        if prov is None or not prov.same_run(here):
            check_held_out(directory, sp, dataset.catalog.item_ids)

    if model_dir is not None:
        check_saved(model_dir)
        model = recommender_class(recommender).load(Path(model_dir), dataset.catalog)
    else:
        model = model if model is not None else build(recommender, overrides)
        part_dir = getattr(getattr(model, "cfg", None), "model_dir", None)  # a pipeline over a saved model
        if part_dir is not None:
            check_saved(part_dir)
        if hasattr(model, "cfg") and hasattr(model.cfg, "seed"):
            model.cfg = model.cfg.model_copy(update={"seed": seed})
        if hasattr(model, "cfg") and hasattr(model.cfg, "quiet") and quiet:
            model.cfg = model.cfg.model_copy(update={"quiet": True})
        prov = Provenance.of(dataset, sp, split_name=split, seed=seed, ties=ties, config=model.config(), events=events)
        if hasattr(model, "provenance"):
            model.provenance = prov.model_dump(exclude={"config"})
        log(console, f"fitting {recommender}", quiet)
        model.fit(sp.train, dataset.catalog, valid=sp.valid)
    fit_seconds = time.perf_counter() - t_fit
    if save_to is not None:
        model.save(Path(save_to))
        prov.config = model.config()
        prov.save(save_to, trained_keys(sp, dataset.catalog.item_ids))
    results = {}
    with progress_bar(console, quiet=quiet) as bar:
        for name, cases, slices in (("valid", sp.valid, sp.valid_slices), ("test", sp.test, sp.slices)):
            task = bar.task(f"ranking {name}", total=len(cases))
            results[name] = evaluate_cases(model, cases, train=sp.train, slices=slices,
                                           progress=lambda done, total, t=task: t.update(done))
    report = {
        "dataset": {"name": dataset.name, "path": str(data), **dataset.counts()},
        "split": {"name": sp.name, "ties": ties, "seed": seed, "train_events": len(sp.train),
                  "valid_cases": len(sp.valid), "test_cases": len(sp.test), **sp.info},
        "train_window": {"dataset": dataset.name, "n_events": len(sp.train),
                         "first_timestamp": float(sp.train["timestamp"].min()) if len(sp.train) else None,
                         "last_timestamp": float(sp.train["timestamp"].max()) if len(sp.train) else None,
                         "n_users": int(sp.train["user_id"].nunique()), "n_items": int(sp.train["item_id"].nunique())},
        "recommender": recommender,
        "config": model.config(),
        "model_dir": str(model_dir or save_to) if (model_dir or save_to) else None,
        "fit_seconds": fit_seconds,
        "total_seconds": time.perf_counter() - t0,
    }
    result = getattr(model, "result", None)
    if hasattr(result, "to_dict"):
        report["train"] = result.to_dict()
    notes = []
    if report["config"].get("refit_with_valid"):
        notes.append("refit_with_valid: the final model was trained on the validation targets too, so the "
                     "'valid' numbers are not held-out; the epoch count was chosen on validation before that")
    if model_dir is not None:
        notes.append("a saved model: it early-stopped (or trained) on the validation targets, so 'valid' is not "
                     "held-out; 'test' is (checked against its provenance)")
    for name, res in results.items():
        report[name] = res["metrics"]
        report[f"{name}_keep_history"] = res["keep_history"]
        report[f"{name}_slices"] = res["slices"]
        report[f"{name}_beyond"] = res["beyond"]
        # each case's target rank (history excluded, in the split's case order): two models' reports on the same
        # split compare case by case (`benchmarks/bench_tune.py paired`)
        report[f"{name}_ranks"] = np.asarray(res["ranks"]).tolist()
        if "degradation" in res:
            report[f"{name}_degradation"] = deg = res["degradation"]
            scored = deg.get("scored", deg["requests"])
            if scored and deg["degraded"] == scored:
                report["recommender"] = f"{recommender} (fully degraded: every request fell back to retrieval order)"
                notes.append(f"{name}: the scorer failed on every request ({deg['degraded_reasons']}); these are "
                             "retrieval-order numbers, not the scorer's")
            elif deg["degraded"]:
                notes.append(f"{name}: {deg['degraded']} of {scored} scored requests fell back to retrieval order "
                             f"({deg['degraded_reasons']})")
    if notes:
        report["notes"] = notes
    return report
