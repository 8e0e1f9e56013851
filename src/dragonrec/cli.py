"""The `dragonrec` command line: thin commands over library functions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="dragonrec: train, evaluate and serve a language-model product recommender.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

SPLITS = ("loo", "time", "cold-item")
TIES = ("keep", "shuffle")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{flag} must be one of {', '.join(choices)}, not {value!r}")


def _parse_overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _metrics_table(title: str, report: dict) -> Table:
    table = Table(title=title)
    table.add_column("split / slice")
    keys = ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr", "cases"]
    for k in keys:
        table.add_column(k, justify="right")
    for name in ("valid", "test"):
        rows = [(name, report[name])]
        rows.append((f"{name} (history kept)", report[f"{name}_keep_history"]))
        rows += [(f"{name} {s}", m) for s, m in report[f"{name}_slices"].items() if m["cases"]]
        for label, m in rows:
            table.add_row(label, *[str(m[k]) if k == "cases" else f"{m[k]:.4f}" for k in keys])
    for note in report.get("notes", []):
        table.caption = ((table.caption + "\n") if table.caption else "") + f"note: {note}"
    return table


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="dataset directory (items.* + interactions.*) or a feedback log")],
    recommender: Annotated[str | None, typer.Option(help="popularity, cooccurrence, sasrec, generative, rag, ... "
                                                    "(default: what --model holds, else popularity)")] = None,
    model: Annotated[Path | None, typer.Option(help="load a saved model directory instead of training")] = None,
    split: Annotated[str, typer.Option(help="loo (leave-one-out), time, or cold-item")] = "loo",
    output: Annotated[Path | None, typer.Option(help="write the full report as JSON here")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config field: --set window=3")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="skip and count malformed rows instead of failing")] = False,
    seed: Annotated[int, typer.Option(help="seed for splits and models")] = 0,
    ties: Annotated[str, typer.Option(help="keep the file's order of same-timestamp events, or shuffle it with "
                                      "the seed (training and evaluation alike)")] = "keep",
    quiet: Annotated[bool, typer.Option(help="no progress or log lines, only the result table")] = False,
) -> None:
    """Train (or load) a recommender and evaluate it by full ranking on validation and test. A saved model
    (--model) is refused on a split whose test targets it may have trained on.

    Example: dragonrec evaluate --data ../shared/data/amazon-beauty --recommender cooccurrence --ties shuffle
    """
    from dragonrec.evaluate.experiment import run_evaluation

    if split not in SPLITS:
        raise typer.BadParameter(f"--split must be one of {', '.join(SPLITS)}")
    if recommender is None and model is None:
        recommender = "popularity"
    _check_choice("--ties", ties, TIES)
    report = run_evaluation(data, recommender, model_dir=model, split=split, overrides=_parse_overrides(set_),
                            on_error="skip" if skip_bad_rows else "raise", seed=seed, ties=ties, console=console,
                            quiet=quiet)
    Console(width=160).print(_metrics_table(f"{report['recommender']} on {report['dataset']['name']} ({split})", report))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=float))
        console.print(f"wrote {output}")


train_app = typer.Typer(help="Train models.", no_args_is_help=True)
app.add_typer(train_app, name="train", help="Train models. Example: dragonrec train sft --data DIR --out runs/sft")


@train_app.command("sft")
def train_sft(
    data: Annotated[Path, typer.Option(help="dataset directory")],
    out: Annotated[Path, typer.Option(help="run directory: model/, checkpoints/, report.json")],
    recommender: Annotated[str, typer.Option(help="generative (item text) or sasrec (IDs only)")] = "generative",
    registry: Annotated[Path | None, typer.Option(help="register the trained version here and activate it")] = None,
    split: Annotated[str, typer.Option(help="loo, time or cold-item")] = "loo",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config field: --set hidden_size=128")] = None,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    ties: Annotated[str, typer.Option(help="keep or shuffle the order of same-timestamp events")] = "keep",
    quiet: Annotated[bool, typer.Option(help="no progress or log lines, only the result table")] = False,
) -> None:
    """Supervised fine-tuning on session narratives: train, early-stop on validation NDCG@10, save, evaluate,
    and (with --registry) register the version with its metrics and data window and make it active.
    Interrupted runs resume from out/checkpoints.

    Example: dragonrec train sft --data ../shared/data/amazon-beauty --out runs/sft --registry runs/registry
    """
    from dragonrec.train.sft import run_sft

    if split not in SPLITS:
        raise typer.BadParameter(f"--split must be one of {', '.join(SPLITS)}")
    _check_choice("--ties", ties, TIES)
    report = run_sft(data, out, recommender=recommender, overrides=_parse_overrides(set_), split=split,
                     registry=registry, seed=seed, ties=ties, console=console, quiet=quiet)
    Console(width=160).print(_metrics_table(f"{recommender} on {report['dataset']['name']} ({split})", report))
    console.print(f"model in {out / 'model'}" + (f"; registered as {report['version']}" if registry else ""))


@app.command()
def tune(
    data: Annotated[Path, typer.Option(help="dataset directory")],
    out: Annotated[Path, typer.Option(help="run directory: tuned_config.json, model/, checkpoints/, report.json")],
    recommender: Annotated[str, typer.Option(help="generative, sasrec or cooccurrence")] = "generative",
    trials: Annotated[int, typer.Option(help="at most this many trials")] = 20,
    minutes: Annotated[float, typer.Option(help="time budget of the whole search (the final training comes after)")] = 20.0,
    seed: Annotated[int, typer.Option(help="seed of the sampler, the models and the split (same seed, same trials)")] = 0,
    registry: Annotated[Path | None, typer.Option(help="register the final model here and activate it")] = None,
    split: Annotated[str, typer.Option(help="loo, time or cold-item")] = "loo",
    set_: Annotated[list[str] | None, typer.Option("--set", help="fix a config field in every trial (it is not "
                                                   "searched): --set max_epochs=50")] = None,
    ties: Annotated[str, typer.Option(help="keep or shuffle the order of same-timestamp events")] = "keep",
    quiet: Annotated[bool, typer.Option(help="no progress or log lines, only the result tables")] = False,
) -> None:
    """Search a recommender's settings (hidden size, layers, dropout, learning rate, max history length, id
    dropout, weight decay; co-occurrence: window, last_n, weights) with Optuna TPE and median pruning, on
    validation NDCG@10 only, within --trials and --minutes; one line per trial. Then train the final model
    with the best configuration as `train sft` does (refit on train + validation targets, saved, evaluated
    on test, registered with --registry) and save out/tuned_config.json (the best configuration and every
    trial) beside it.

    Example: dragonrec tune --data ../shared/data/ml-100k --out runs/tune-ml100k --recommender generative --trials 20 --minutes 20
    """
    from dragonrec.tune import TUNABLE, TuneConfig, run_tune, trials_table

    _check_choice("--recommender", recommender, TUNABLE)
    _check_choice("--split", split, SPLITS)
    _check_choice("--ties", ties, TIES)
    if registry is not None and recommender == "cooccurrence":
        raise typer.BadParameter("cooccurrence has no saved form to register: drop --registry")
    report = run_tune(data, out, recommender=recommender, tune=TuneConfig(trials=trials, minutes=minutes, seed=seed),
                      overrides=_parse_overrides(set_), split=split, ties=ties, registry=registry, console=console,
                      quiet=quiet)
    tuned = json.loads((out / "tuned_config.json").read_text())
    table = Table("trial", "state", "valid ndcg@10", "seconds", "settings",
                  title=f"{recommender} search: best trial {tuned['best_trial']} "
                        f"({tuned['seconds'] / 60:.1f} min, stopped by {tuned['stopped']})")
    for row in trials_table(tuned["trials"]):
        table.add_row(*row, style="bold" if row[0] == str(tuned["best_trial"]) else None)
    Console(width=160).print(table)
    Console(width=160).print(_metrics_table(f"tuned {recommender} on {report['dataset']['name']} ({split})", report))
    console.print(f"tuned configuration in {out / 'tuned_config.json'}"
                  + (f"; model in {out / 'model'}" if recommender != "cooccurrence" else "")
                  + (f"; registered as {report['version']}" if registry else ""))


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="dataset directory")] = Path("../shared/data/amazon-beauty"),
    out: Annotated[Path, typer.Option(help="the shop's state: registry, feedback store, trained model")] = Path("runs/demo"),
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    train_minutes: Annotated[float, typer.Option(help="time budget of the first training (early stopping inside it)")] = 5.0,
    retrain: Annotated[bool, typer.Option(help="train again even if the registry has a model for this dataset")] = False,
    loop: Annotated[bool, typer.Option(help="run the feedback loop in the background: the shop's visitors teach the model")] = False,
    loop_method: Annotated[str, typer.Option(help="the loop's method: sft, dpo, sdpo or pg")] = "dpo",
    loop_every: Annotated[float, typer.Option(help="seconds between loop rounds (with --loop)")] = 300.0,
    serve: Annotated[bool, typer.Option(help="start the shop (--no-serve: only prepare the model)")] = True,
) -> None:
    """The main job: a working shop on real products. Reads the dataset, trains a small generative model within
    --train-minutes with visible progress (or reuses the registry's model for this dataset), registers it as the
    active version, and starts the API, the storefront and the admin dashboard on http://HOST:PORT with a SQLite
    feedback store. Every action of a visitor is stored; --loop fine-tunes, gates and promotes new versions from
    them in the background, and the shop swaps to each one without a restart. `dragonrec benchmark` is the long
    evaluation run.

    Example: dragonrec demo --data ../shared/data/amazon-beauty --loop
    """
    import os
    import secrets

    from dragonrec.registry import Registry
    from dragonrec.train.sft import run_sft

    _check_choice("--loop-method", loop_method, ("sft", "dpo", "sdpo", "pg"))
    registry = Registry(out / "registry")
    active = registry.active()
    name = data.resolve().name
    fits = active is not None and active.info.data_window is not None and active.info.data_window.dataset == name
    if retrain or not fits:
        console.print(f"training a small generative model on {data} (at most {train_minutes:g} min, then it is "
                      "evaluated on validation and test)")
        overrides = {"max_minutes": train_minutes, "refit_with_valid": False}
        report = run_sft(data, out / "generative", overrides=overrides, registry=out / "registry", console=console)
        Console(width=160).print(_metrics_table(f"generative on {report['dataset']['name']}", report))
        version = report["version"]
    else:
        version = active.version
        console.print(f"using {version} from {registry.root} (trained on {name}; --retrain to train again)")
    if not serve:
        console.print(f"ready: {version} is active in {registry.root}")
        return

    import uvicorn

    from dragonrec.serve import Settings, create_app

    key = os.environ.get("DRAGONREC_API_KEY")
    if not key:
        key = secrets.token_urlsafe(18)
        console.print(f"admin key for this run (dashboard at /admin, write routes): {key}")
    settings = Settings(data_dir=data, state_dir=out / "shop", registry_dir=out / "registry", host=host, port=port,
                        api_keys=[key], loop_method=loop_method if loop else None,
                        loop_every_s=loop_every if loop else None)
    console.print(f"the shop is at http://{host}:{port}  (API docs /docs, dashboard /admin"
                  + (f", loop: {loop_method} every {loop_every:g} s" if loop else "") + "); Ctrl-C stops it")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


@app.command()
def benchmark(
    data: Annotated[Path, typer.Option(help="dataset directory")] = Path("../shared/data/amazon-beauty"),
    out: Annotated[Path, typer.Option(help="where reports, the trained model and the registry go")] = Path("runs/benchmark"),
    train: Annotated[bool, typer.Option(help="also train the generative model (about 16 min on 2 cores)")] = True,
) -> None:
    """The long evaluation run: the baselines (popularity, co-occurrence, RAG, sasrec), then the generative model
    trained in full (about 16 min on 2 cores), registered as the active version, evaluated with the pipeline
    that serves it (candidate union + generative scorer); one JSON report each and a summary.json.

    Example: dragonrec benchmark --data ../shared/data/amazon-beauty --out runs/benchmark
    """
    from dragonrec.evaluate.experiment import DEMO_RECOMMENDERS, run_evaluation
    from dragonrec.train.sft import run_sft

    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, overrides in DEMO_RECOMMENDERS.items():
        report = run_evaluation(data, name, overrides=overrides, console=console)
        (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=float))
        Console(width=160).print(_metrics_table(f"{name} on {report['dataset']['name']}", report))
        summary[name] = {"test": report["test"], "fit_seconds": report["fit_seconds"]}
    if train:
        report = run_sft(data, out / "generative", registry=out / "registry", console=console)
        Console(width=160).print(_metrics_table(f"generative on {report['dataset']['name']}", report))
        summary["generative"] = {"test": report["test"], "fit_seconds": report["fit_seconds"],
                                 "version": report["version"]}
        # What a request is served with: the candidate union scored by the model just trained.
        pipe = {"model_dir": str(out / "generative" / "model"), "dense": {"cache_dir": ".cache/embeddings"}}
        report = run_evaluation(data, "pipeline", overrides=pipe, console=console)
        (out / "pipeline.json").write_text(json.dumps(report, indent=2, default=float))
        Console(width=160).print(_metrics_table(f"pipeline (union + generative scorer) on {data.name}", report))
        summary["pipeline"] = {"test": report["test"], "fit_seconds": report["fit_seconds"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    console.print(f"reports in {out}")


@app.command()
def serve(
    data: Annotated[Path | None, typer.Option(help="dataset directory: the catalog and past events the shop starts "
                                              "from (or data_dir in the settings file)")] = None,
    store: Annotated[str | None, typer.Option(help="feedback store URL (default: SQLite under the state dir)")] = None,
    registry: Annotated[Path | None, typer.Option(help="model registry; its active version serves (default: "
                                                  "state_dir/registry; none active: the popularity fallback)")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind (default 8000)")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="where the service keeps its state (default .dragonrec)")] = None,
    settings_file: Annotated[Path | None, typer.Option(help="a TOML or JSON settings file (any Settings field)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="API worker processes (stateless: use one per core over a "
                                         "PostgreSQL store; each holds the model in its own memory)")] = 1,
) -> None:
    """Start the HTTP API (and the storefront) over a dataset and the registry's active model version, which
    is reloaded without dropping requests when it changes. Write and admin routes need a key from
    DRAGONREC_API_KEY (comma-separated to rotate) or the settings file; other settings come from DRAGONREC_*
    variables (see dragonrec.serve.settings). OpenAPI at /openapi.json.

    Example: DRAGONREC_API_KEY=change-me-to-a-long-secret dragonrec serve --data ../shared/data/amazon-beauty --port 8000
    """
    import logging

    import uvicorn

    from dragonrec.serve import Settings, create_app

    # the service's own lines (version loaded, swapped, a failed load and why) beside uvicorn's
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    given = {"data_dir": data, "store_url": store, "registry_dir": registry, "host": host, "port": port,
             "state_dir": state_dir, "settings_file": settings_file}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    if settings.data_dir is None:
        raise typer.BadParameter("name the dataset directory: --data DIR (or data_dir in the settings file)")
    if not settings.api_keys:
        console.print("note: no API key configured (DRAGONREC_API_KEY): write and admin routes are refused")
    console.print(f"dragonrec serving {settings.data_dir} on http://{settings.host}:{settings.port} "
                  f"(API docs: /docs, OpenAPI: /openapi.json)")
    if workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
        return
    if settings.loop_every_s is not None:  # every worker would run its own rounds on the same store and registry
        raise typer.BadParameter("with --workers above 1 the scheduled feedback loop (loop_every_s) would run in "
                                 "every worker: run it once beside them (`dragonrec loop`) and unset loop_every_s")
    # Each worker builds the app from the environment (uvicorn's factory mode): pass the options on to it.
    env = {"data_dir": settings.data_dir, "store_url": store, "registry_dir": registry, "state_dir": state_dir,
           "settings_file": settings_file}
    os.environ.update({f"DRAGONREC_{k.upper()}": str(v) for k, v in env.items() if v is not None})
    # The workers' metrics in one place, so /metrics sums them whichever worker answers (dragonrec.serve.metrics):
    # a directory of this server's own, emptied at start (values of an earlier run would add up otherwise).
    from dragonrec.serve.metrics import MULTIPROC_ENV

    shared = Path(settings.state_dir) / f"metrics-{settings.port}"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(shared)
    uvicorn.run("dragonrec.serve.app:app_from_env", factory=True, workers=workers, host=settings.host,
                port=settings.port, log_level="info")


@app.command("loop")
def loop_cmd(
    data: Annotated[Path, typer.Option(help="dataset directory the base model was trained on")],
    store: Annotated[str, typer.Option(help="feedback store URL or SQLite path (the shop's)")],
    registry: Annotated[Path, typer.Option(help="model registry: its active version is the starting point")],
    method: Annotated[str, typer.Option(help="sft, dpo, sdpo or pg")] = "dpo",
    every: Annotated[float | None, typer.Option(help="run a round every this many seconds")] = None,
    after_events: Annotated[int | None, typer.Option(help="run a round whenever this many new events arrived")] = None,
    rounds: Annotated[int | None, typer.Option(help="stop after this many rounds (default: one without a schedule)")] = None,
    max_ndcg_drop: Annotated[float, typer.Option(help="the gate: held-out NDCG@10 may drop at most this share")] = 0.02,
    holdout_share: Annotated[float, typer.Option(help="share of users held out as the gate")] = 0.1,
    set_: Annotated[list[str] | None, typer.Option("--set", help="a field of the method's config: --set lr=1e-4")] = None,
) -> None:
    """The feedback loop over a store's logs: new impressions and events -> rewards -> preference data ->
    fine-tune (the method) -> gate (held-out NDCG, and off-policy value where propensities were logged) ->
    register and activate. Once (the default), on a schedule (--every) or after N new events (--after-events).
    A failed or interrupted round leaves the active version as it was; `dragonrec models rollback` undoes one.

    Example: dragonrec loop --data ../shared/data/amazon-beauty --store runs/demo/shop/feedback.db --registry runs/demo/registry --method dpo
    """
    from dragonrec.data import load_dataset
    from dragonrec.loop import FeedbackLoop, GateConfig, LoopConfig, gate_cases_from
    from dragonrec.store import Store

    _check_choice("--method", method, ("sft", "dpo", "sdpo", "pg"))
    ds = load_dataset(data)
    gate, held = gate_cases_from(ds.events, holdout_share)
    cfg = LoopConfig(method=method, method_config=_parse_overrides(set_), gate=GateConfig(max_ndcg_drop=max_ndcg_drop))
    with Store.open(store, items=ds.catalog) as st:
        fl = FeedbackLoop(registry, st, ds.catalog, ds.events, gate, cfg, holdout_users=held)
        results = fl.run(every_s=every, after_events=after_events, max_rounds=rounds)
    for r in results:
        console.print(f"{r.round_id}: {r.status} ({r.reason})" + (f" -> {r.version}" if r.version else ""))
    if not results:
        raise typer.Exit(1)


models_app = typer.Typer(help="Model versions in a registry. Example: dragonrec models list --registry runs/demo/registry",
                         no_args_is_help=True)
app.add_typer(models_app, name="models",
              help="Model versions: list, activate, rollback. Example: dragonrec models list --registry runs/demo/registry")


@models_app.command("list")
def models_list(registry: Annotated[Path, typer.Option(help="registry directory")]) -> None:
    """Every version with its method, parent, data window and whether it is active.

    Example: dragonrec models list --registry runs/demo/registry
    """
    from dragonrec.registry import Registry

    reg = Registry(registry)
    active = reg.active_version()
    table = Table("version", "method", "parent", "events", "active")
    for v in reg.list():
        table.add_row(v.version, v.method, v.parent or "", str(v.data_window.n_events if v.data_window else ""),
                      "*" if v.version == active else "")
    Console(width=120).print(table)


@models_app.command("activate")
def models_activate(version: Annotated[str, typer.Argument(help="e.g. v0003")],
                    registry: Annotated[Path, typer.Option(help="registry directory")]) -> None:
    """Make a version the active one (running services switch to it without a restart).

    Example: dragonrec models activate v0002 --registry runs/demo/registry
    """
    from dragonrec.registry import Registry

    console.print(f"active: {Registry(registry).activate(version).version}")


@models_app.command("rollback")
def models_rollback(registry: Annotated[Path, typer.Option(help="registry directory")]) -> None:
    """Re-activate the version that was active before the current one.

    Example: dragonrec models rollback --registry runs/demo/registry
    """
    from dragonrec.registry import Registry

    console.print(f"active: {Registry(registry).rollback().version}")


def main() -> None:  # pragma: no cover
    app()
