"""The `dragonrec` command line: thin commands over library functions."""

from __future__ import annotations

import json
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
def demo(
    data: Annotated[Path, typer.Option(help="dataset directory")] = Path("../shared/data/amazon-beauty"),
    out: Annotated[Path, typer.Option(help="where reports, the trained model and the registry go")] = Path("runs/demo"),
    train: Annotated[bool, typer.Option(help="also train the generative model (about 16 min on 2 cores)")] = True,
) -> None:
    """The main job: evaluate the baselines (popularity, co-occurrence, RAG, sasrec), then train the generative
    model, register it as the active version, evaluate it and the pipeline that serves it (candidate union +
    generative scorer); one JSON report each and a summary.json.

    Example: dragonrec demo --data ../shared/data/amazon-beauty --out runs/demo
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
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def main() -> None:  # pragma: no cover
    app()
