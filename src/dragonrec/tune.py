"""Hyper-parameter search on validation NDCG@10: Optuna TPE (seeded), median pruning, a trial and time budget.

    result = search(split, catalog, "generative", TuneConfig(trials=20, minutes=20, seed=0))
    result.best_params                        # the overrides to build the model with: build(name, best_params)
    report = run_tune(data, "runs/tune", recommender="generative")   # what `dragonrec tune` runs

A trial fits the recommender on `split.train` and is scored on `split.valid` only: the test cases are never
read by the search. Sequence models report every validation NDCG@10 of their early stopping to the pruner,
which stops a trial that falls below the median of earlier trials at the same epoch. Trial 0 is the
recommender's default configuration, so the chosen one is never worse than it on validation; and the best
trial replaces it only if its gain, paired over the validation cases, is at least `min_gain_se` standard errors
(the winner of many trials on a small validation set is otherwise mostly noise). `run_tune` then
trains the final model with the best configuration the way `dragonrec train sft` does (early stopping, refit
on train + validation targets, saved with its provenance, evaluated, registered) and saves
`tuned_config.json` (best configuration and every trial) beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from rich.console import Console

from dragonrec.data.catalog import Catalog
from dragonrec.data.splits import Split
from dragonrec.data.stats import suggest_max_len
from dragonrec.progress import is_terminal, log

TUNABLE = ("sasrec", "generative", "cooccurrence")
TUNED_CONFIG = "tuned_config.json"


class TuneConfig(BaseModel):
    """The search's budget and behaviour (the searched settings are in `search_space`)."""

    trials: int = Field(20, ge=1)  # at most this many trials
    minutes: float = Field(20.0, gt=0)  # wall-clock budget of the whole search; a trial gets at most what is left
    trial_share: float = Field(0.5, gt=0, le=1)  # and at most this share of it: one slow setting cannot take all
    seed: int = 0  # seed of the sampler and of every trial's model (same seed, same trials)
    startup_trials: int = Field(5, ge=1)  # random trials before TPE models the space
    prune_after_trials: int = Field(2, ge=0)  # finished trials before the pruner may stop one
    warmup_epochs: int = Field(10, ge=0)  # epochs a trial trains before the pruner may stop it (slow starters)
    min_trial_seconds: float = Field(5.0, ge=0)  # start no trial with less time than this left
    enqueue_default: bool = True  # trial 0 = the recommender's default configuration
    # The best trial replaces the default (trial 0) only if its validation NDCG@10 gain, paired over the validation
    # cases, is at least this many standard errors: a winner among many noisy trials on a small validation set is
    # mostly noise (0 = take the best value as it is)
    min_gain_se: float = Field(2.0, ge=0)


@dataclass
class TuneResult:
    """What a search did: its trials (params, value, state, seconds) and the best configuration."""

    recommender: str
    best_params: dict
    best_value: float | None
    best_trial: int | None
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # "trials" (all run) or "time" (budget spent)
    guard: dict = field(default_factory=dict)  # the best trial against the default: gain, se, kept_default
    space: dict = field(default_factory=dict)  # searched setting -> its distribution, as text
    fixed: dict = field(default_factory=dict)  # settings every trial shares (--set overrides)
    tune: dict = field(default_factory=dict)  # the TuneConfig

    def overrides(self) -> dict:
        """The config overrides of the chosen model: the fixed settings and the best searched ones."""
        return {**self.fixed, **self.best_params}

    def to_dict(self) -> dict:
        return asdict(self) | {"overrides": self.overrides()}


def search_space(recommender: str, train=None) -> dict:
    """Optuna distributions of the settings that matter, by recommender; ranges suit small CPU models.

    The max history length's range comes from the training history lengths (`suggest_max_len` at the 99th
    percentile, two tokens an event in narrative mode), never below the default 50.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if recommender == "cooccurrence":
        return {"window": IntDistribution(1, 10), "last_n": IntDistribution(1, 10),
                "backward_weight": FloatDistribution(0.0, 1.0, step=0.05),
                "decay": FloatDistribution(0.1, 1.0, step=0.05), "alpha": FloatDistribution(0.0, 1.0, step=0.1)}
    if recommender not in ("sasrec", "generative"):
        raise ValueError(f"no search space for {recommender!r} (tunable: {', '.join(TUNABLE)})")
    hi = 50
    if train is not None and len(train):
        per_event = 2 if train["action"].nunique() > 1 else 1  # narrative mode: an action token per event
        hi = max(hi, suggest_max_len(train.groupby("user_id").size().to_numpy(), percentile=99.0,
                                     tokens_per_event=per_event, lo=16, hi=256))
    space = {
        "hidden_size": CategoricalDistribution([32, 64, 128]),
        "num_layers": IntDistribution(1, 3),
        "emb_dropout": FloatDistribution(0.0, 0.7, step=0.05),
        "hidden_dropout": FloatDistribution(0.0, 0.7, step=0.05),
        "lr": FloatDistribution(3e-4, 1e-2, log=True),
        "weight_decay": CategoricalDistribution([0.0, 1e-3, 1e-2, 1e-1]),
        "max_len": IntDistribution(8, hi, log=True),
    }
    if recommender == "generative":
        space["id_dropout"] = FloatDistribution(0.0, 0.5, step=0.05)
        # the text path on or off, chosen on validation: item text that does not help is dropped (IDs alone)
        space["use_text"] = CategoricalDistribution([True, False])
    return space


def default_params(recommender: str, space: dict, train=None) -> dict:
    """The recommender's default value of each searched setting that its distribution holds; with `train`, the
    data-driven defaults resolved on it (a dense dataset's dropout), as the default model would train."""
    from dragonrec.recommenders import build

    cfg = build(recommender).cfg
    if train is not None and hasattr(cfg, "adapted_to"):
        cfg = cfg.adapted_to(train)[0]
    out = {}
    for name, dist in space.items():
        value = getattr(cfg, name, None)
        if value is not None and _holds(dist, value):
            out[name] = value
    return out


def _holds(dist, value) -> bool:
    """Whether `value` is one the distribution can sample (in range, on its step grid, among its choices)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if not dist.low <= value <= dist.high:
        return False
    step = getattr(dist, "step", None)
    return step is None or abs((value - dist.low) / step - round((value - dist.low) / step)) < 1e-6


def _describe(dist) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"one of {list(dist.choices)}"
    scale = " (log)" if getattr(dist, "log", False) else ""
    step = f" step {dist.step}" if getattr(dist, "step", None) else ""
    return f"[{dist.low}, {dist.high}]{step}{scale}"


def search(split: Split, catalog: Catalog, recommender: str, tune: TuneConfig | None = None,
           overrides: dict | None = None, console: Console | None = None, quiet: bool = False) -> TuneResult:
    """Search `recommender`'s settings on `split.valid` (never `split.test`) within the trial and time budget.

    `overrides` are fixed in every trial and left out of the search. Each trial trains with the tune seed,
    early-stops on validation NDCG@10 and gets as its `max_minutes` the time left, at most `trial_share` of
    the budget (a trial that would overrun is cut: it keeps its best validation score so far).
    """
    import optuna

    from dragonrec.recommenders import build

    tune = tune or TuneConfig()
    overrides = dict(overrides or {})
    console = console or Console(stderr=True)
    sequential = recommender in ("sasrec", "generative")
    space = {k: v for k, v in search_space(recommender, split.train).items() if k not in overrides}
    if not space:
        raise ValueError(f"every searched setting of {recommender} is fixed by the overrides: nothing to tune")
    sampler = optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=tune.prune_after_trials, n_warmup_steps=tune.warmup_epochs)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial replaces Optuna's
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    if tune.enqueue_default:
        study.enqueue_trial(default_params(recommender, space, split.train))
    trial_quiet = quiet or not is_terminal(console)  # a live bar per trial on a terminal; silence in logs
    t0 = time.perf_counter()
    deadline = t0 + 60 * tune.minutes
    records: list[dict] = []
    per_case: dict[int, np.ndarray] = {}  # complete trial -> its NDCG@10 on each validation case (for the guard)
    best: dict | None = None
    stopped = "trials"
    try:
        for number in range(tune.trials):
            left = deadline - time.perf_counter()
            if left < max(tune.min_trial_seconds, 1e-3):
                stopped = "time"
                break
            trial = study.ask(space)
            # stepped floats come back as 0.30000000000000004: the config and the report get 0.3
            params = {k: round(v, 8) if isinstance(v, float) and getattr(space[k], "step", None) else v
                      for k, v in trial.params.items()}
            t1 = time.perf_counter()
            rec = {"number": number, "params": params}
            value = None
            try:
                if sequential:
                    minutes = min(left / 60, tune.trial_share * tune.minutes)
                    if overrides.get("max_minutes") is not None:
                        minutes = min(minutes, float(overrides["max_minutes"]))
                    model = build(recommender, {**overrides, **params, "seed": tune.seed, "refit_with_valid": False,
                                                "max_minutes": minutes, "checkpoint_dir": None,
                                                "quiet": trial_quiet, "label": f"trial {number}"})

                    def on_eval(epoch: int, ndcg: float, trial=trial) -> bool:
                        trial.report(ndcg, epoch)
                        return trial.should_prune()

                    model.on_eval = on_eval
                    model.fit(split.train, catalog, valid=split.valid)
                    res = model.result
                    value = res.best_ndcg if res.best_ndcg >= 0 else None
                    rec.update(epochs=res.epochs, best_epoch=res.best_epoch, stopped=res.stopped)
                    state = "PRUNED" if res.stopped == "callback" else "COMPLETE" if value is not None else "FAIL"
                else:
                    overrides_all = {**overrides, **params}
                    model = build(recommender, overrides_all).fit(split.train, catalog, valid=split.valid)
                    state = "COMPLETE"
                if state == "COMPLETE":
                    # The objective is the fitted model as it scores (the generative model's cold head calibrated
                    # after early stopping), per validation case: its mean is the trial's value, the cases feed the
                    # guard. Early stopping's own best (without the cold head) is kept beside it.
                    per_case[number] = ndcg_per_case(model, split.valid)
                    if value is not None:
                        rec["early_stopping_value"] = value
                    value = float(per_case[number].mean())
            except Exception:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            if state == "COMPLETE":
                study.tell(trial, value)
            else:
                study.tell(trial, state=getattr(optuna.trial.TrialState, state))
            rec.update(value=value, state=state, seconds=time.perf_counter() - t1)
            rec["cut"] = rec.get("stopped") == "time"
            records.append(rec)
            # A pruned trial's best is real validation NDCG of a model it trained, but the pruner judged it
            # unfinished; only complete trials can be chosen.
            if state == "COMPLETE" and (best is None or value > best["value"]):
                best = rec
            _log_trial(console, rec, best, tune, deadline, quiet)
    finally:
        optuna.logging.set_verbosity(verbosity)
    seconds = time.perf_counter() - t0
    guard: dict = {}
    if tune.enqueue_default and best is not None and best["number"] != 0 and 0 in per_case:  # trial 0: the default
        guard = gain_guard(per_case[0], per_case[best["number"]], tune.min_gain_se)
        if guard["kept_default"]:
            log(console, f"the best trial ({best['number']}) gains {guard['gain']:+.4f} validation NDCG@10 over the "
                         f"default, under {tune.min_gain_se:g} standard errors ({guard['se']:.4f}): the default is kept",
                quiet)
            best = records[0]
    result = TuneResult(recommender=recommender, best_params=dict(best["params"]) if best else {},
                        best_value=best["value"] if best else None, best_trial=best["number"] if best else None,
                        trials=records, seconds=seconds, stopped=stopped, guard=guard,
                        space={k: _describe(v) for k, v in space.items()}, fixed=overrides,
                        tune=tune.model_dump())
    states = {s: sum(r["state"] == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")}
    log(console, f"search: {len(records)} trials ({states['COMPLETE']} complete, {states['PRUNED']} pruned, "
                 f"{states['FAIL']} failed) in {seconds / 60:.1f} min, stopped by {stopped}; best valid ndcg@10 "
                 + (f"{result.best_value:.4f} (trial {result.best_trial}): {_params_text(result.best_params)}"
                    if best else "none (no trial finished)"), quiet)
    return result


def ndcg_per_case(model, cases, batch_size: int = 512) -> np.ndarray:
    """[len(cases)] NDCG@10 of each case (history excluded), as the evaluation computes it."""
    from dragonrec.evaluate.metrics import ndcg_gains, target_ranks

    out = []
    for s in range(0, len(cases), batch_size):
        hist = cases.histories[s:s + batch_size]
        scores = np.asarray(model.score(hist, cases.actions[s:s + batch_size]), dtype=np.float32)
        ranks = target_ranks(scores, cases.targets[s:s + batch_size], exclude=hist)
        out.append(ndcg_gains(ranks, 10))
    return np.concatenate(out) if out else np.zeros(0)


def gain_guard(default: np.ndarray, best: np.ndarray, min_se: float) -> dict:
    """Whether the best trial's validation gain over the default is real: the mean of the paired per-case
    differences against `min_se` standard errors of that mean. {"gain", "se", "z", "kept_default"}."""
    d = np.asarray(best, dtype=np.float64) - np.asarray(default, dtype=np.float64)
    gain = float(d.mean()) if len(d) else 0.0
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    z = gain / se if se > 0 else (math.inf if gain > 0 else 0.0)
    return {"gain": gain, "se": se, "z": z, "cases": len(d), "min_se": min_se, "kept_default": bool(z < min_se)}


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _log_trial(console: Console, rec: dict, best: dict | None, tune: TuneConfig, deadline: float,
               quiet: bool) -> None:
    what = {"COMPLETE": "done", "PRUNED": f"pruned at epoch {rec.get('epochs')}", "FAIL": "no validation"}[rec["state"]]
    if rec.get("cut"):
        what += " (cut by the time budget)"
    value = "-" if rec["value"] is None else f"{rec['value']:.4f}"
    best_text = f"best {best['value']:.4f} (trial {best['number']})" if best else "best -"
    left = max(deadline - time.perf_counter(), 0) / 60
    log(console, f"trial {rec['number'] + 1}/{tune.trials} {what}: valid ndcg@10 {value} | {best_text} | "
                 f"{rec['seconds']:.0f} s, {left:.1f} min left | {_params_text(rec['params'])}", quiet)


def save_tuned(result: TuneResult, path: Path | str, extra: dict | None = None) -> Path:
    """Write the search (best configuration, every trial) as JSON; returns the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), **result.to_dict()}, indent=2, default=float))
    return path


def load_tuned(path: Path | str) -> tuple[str, dict]:
    """(recommender, config overrides) from a `tuned_config.json`: `build(*load_tuned(p))` is the tuned model."""
    path = Path(path)
    if path.is_dir():
        path = path / TUNED_CONFIG
    data = json.loads(path.read_text())
    return data["recommender"], {**data["fixed"], **data["best_params"]}


def run_tune(data: Path | str, out: Path | str, *, recommender: str = "generative", tune: TuneConfig | None = None,
             overrides: dict | None = None, split: str = "loo", ties: str = "keep", registry: Path | str | None = None,
             console: Console | None = None, quiet: bool = False) -> dict:
    """Search on validation, then train, save, evaluate (and register) the final model with the best
    configuration as `dragonrec train sft` does; writes out/tuned_config.json (also in out/model/, so it
    travels with the model into the registry) and out/report.json (with a "tuning" summary)."""
    from dragonrec.data import load_dataset, shuffle_ties
    from dragonrec.evaluate.experiment import make_split, run_evaluation
    from dragonrec.train.sft import run_sft

    if recommender not in TUNABLE:
        raise ValueError(f"cannot tune {recommender!r} (tunable: {', '.join(TUNABLE)})")
    savable = recommender != "cooccurrence"
    if registry is not None and not savable:
        raise ValueError(f"{recommender} has no saved form to register; tune it without a registry")
    tune = tune or TuneConfig()
    console = console or Console(stderr=True)
    out = Path(out)
    dataset = load_dataset(data)
    events = shuffle_ties(dataset.events, tune.seed) if ties == "shuffle" else dataset.events
    sp = make_split(events, split, seed=tune.seed)
    log(console, f"tuning {recommender} on {dataset.name} ({split}, ties {ties}): {len(sp.train)} training events, "
                 f"{len(sp.valid)} validation cases; at most {tune.trials} trials in {tune.minutes:g} min", quiet)
    result = search(sp, dataset.catalog, recommender, tune, overrides, console=console, quiet=quiet)
    if result.best_trial is None:
        raise RuntimeError("no trial finished within the budget: give the search more minutes")
    extra = {"dataset": dataset.name, "data": str(data), "split": split, "ties": ties, "seed": tune.seed}
    save_tuned(result, out / TUNED_CONFIG, extra)
    final = result.overrides()
    log(console, f"training the final {recommender} with the best configuration (trial {result.best_trial})", quiet)
    if savable:
        save_tuned(result, out / "model" / TUNED_CONFIG, extra)  # beside the weights, before they are registered
        # Checkpoints are keyed by the configuration: a rerun with another best one must not resume this one's.
        key = hashlib.sha256(json.dumps(final, sort_keys=True, default=str).encode()).hexdigest()[:10]
        final.setdefault("checkpoint_dir", str(out / "checkpoints" / f"final-{key}"))
        report = run_sft(data, out, recommender=recommender, overrides=final, split=split, registry=registry,
                         seed=tune.seed, ties=ties, console=console, quiet=quiet)
    else:
        report = run_evaluation(data, recommender, split=split, overrides=final, seed=tune.seed, ties=ties,
                                console=console, quiet=quiet)
    report["tuning"] = {"best_valid_ndcg@10": result.best_value, "best_trial": result.best_trial,
                        "best_params": result.best_params, "trials": len(result.trials),
                        "states": {s: sum(t["state"] == s for t in result.trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
                        "search_seconds": result.seconds, "stopped": result.stopped,
                        "tuned_config": str(out / TUNED_CONFIG)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def trials_table(result_or_trials) -> list[list[str]]:
    """Rows (trial, state, valid NDCG@10, seconds, params) for a terminal table."""
    trials = result_or_trials.trials if isinstance(result_or_trials, TuneResult) else result_or_trials
    rows = []
    for t in trials:
        value = "-" if t["value"] is None or (isinstance(t["value"], float) and math.isnan(t["value"])) \
            else f"{t['value']:.4f}"
        rows.append([str(t["number"]), t["state"].lower() + (" (cut)" if t.get("cut") else ""), value,
                     f"{t['seconds']:.0f}", _params_text(t["params"])])
    return rows


__all__ = ["TUNABLE", "TuneConfig", "TuneResult", "load_tuned", "run_tune", "save_tuned", "search",
           "search_space", "trials_table"]
