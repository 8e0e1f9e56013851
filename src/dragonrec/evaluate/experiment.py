"""One evaluation run end to end: read a dataset, split it, fit (or load) a recommender, rank, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dragonrec.data import cold_item_split, leave_one_out, load_dataset, time_split
from dragonrec.evaluate.runner import evaluate_cases
from dragonrec.recommenders import build, recommender_class

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
                   overrides: dict | None = None, on_error: str = "raise", seed: int = 0,
                   save_to: Path | None = None, console: Console | None = None) -> dict:
    """Evaluate one recommender on one dataset; returns the JSON-ready report.

    `report["test"]` holds the headline metrics (history items excluded from the ranking);
    `test_keep_history` the same with them kept; `test_slices` the cold slices; `test_beyond` coverage,
    diversity and novelty of the top-10 lists.
    """
    console = console or Console(stderr=True)
    if recommender is None:
        if model_dir is None:
            raise ValueError("name a recommender or a saved model directory")
        recommender = saved_recommender_name(model_dir)
    t0 = time.perf_counter()
    dataset = load_dataset(data, on_error=on_error)
    sp = make_split(dataset.events, split, seed=seed)
    console.print(f"[bold]{dataset.name}[/]: {dataset.counts()} | split {sp.name}: {len(sp.train)} training events, "
                  f"{len(sp.valid)} validation and {len(sp.test)} test cases")
    t_fit = time.perf_counter()
    if model_dir is not None:
        model = recommender_class(recommender).load(Path(model_dir), dataset.catalog)
    else:
        model = build(recommender, overrides)
        if hasattr(model, "cfg") and hasattr(model.cfg, "seed"):
            model.cfg = model.cfg.model_copy(update={"seed": seed})
        with console.status(f"fitting {recommender}"):
            model.fit(sp.train, dataset.catalog, valid=sp.valid)
    fit_seconds = time.perf_counter() - t_fit
    if save_to is not None:
        model.save(Path(save_to))
    results = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        for name, cases, slices in (("valid", sp.valid, sp.valid_slices), ("test", sp.test, sp.slices)):
            task = progress.add_task(f"ranking {name}", total=len(cases))
            results[name] = evaluate_cases(model, cases, train=sp.train, slices=slices,
                                           progress=lambda done, total, t=task: progress.update(t, completed=done))
    report = {
        "dataset": {"name": dataset.name, "path": str(data), **dataset.counts()},
        "split": {"name": sp.name, "train_events": len(sp.train), "valid_cases": len(sp.valid),
                  "test_cases": len(sp.test), **sp.info},
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
    if report["config"].get("refit_with_valid"):
        report["note"] = ("refit_with_valid: the final model was trained on the validation targets too, so the "
                          "'valid' numbers are not held-out; the epoch count was chosen on validation before that")
    for name, res in results.items():
        report[name] = res["metrics"]
        report[f"{name}_keep_history"] = res["keep_history"]
        report[f"{name}_slices"] = {k: v for k, v in res.items() if k not in ("metrics", "keep_history", "beyond", "seconds")}
        report[f"{name}_beyond"] = res["beyond"]
    return report
