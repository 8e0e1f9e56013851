"""Training jobs as the command line runs them: train, save, evaluate, register."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from dragonrec.evaluate.experiment import run_evaluation
from dragonrec.recommenders import build


def run_sft(data: Path | str, out: Path | str, *, recommender: str = "generative", overrides: dict | None = None,
            split: str = "loo", registry: Path | str | None = None, seed: int = 0, ties: str = "keep",
            console: Console | None = None, quiet: bool = False) -> dict:
    """Fit a sequence recommender with checkpoints in out/checkpoints (resumed when present and made on the
    same data, split, ties and seed; refused otherwise), save it with its provenance to out/model, evaluate it,
    write out/report.json and, with a registry, register and activate the version with its validation
    metrics (test metrics live in the report only: a registry number must never be a test number). Under
    `accelerate launch` only the main process registers."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    cfg_fields = type(build(recommender).cfg).model_fields
    if "checkpoint_dir" in cfg_fields:
        overrides.setdefault("checkpoint_dir", str(out / "checkpoints"))
    report = run_evaluation(data, recommender, split=split, overrides=overrides, seed=seed, ties=ties,
                            save_to=out / "model", console=console, quiet=quiet)
    from accelerate import PartialState

    # under `accelerate launch` every process runs this job: one version is registered, by the main process,
    # once every process is done
    state = PartialState()
    state.wait_for_everyone()
    if registry is not None and state.is_main_process:
        from dragonrec.registry import DataWindow, Registry

        metrics = {f"valid_{k}": v for k, v in report["valid"].items()}
        if report["config"].get("refit_with_valid"):
            metrics["valid_note"] = "refit on the validation targets after early stopping: valid is not held-out"
            best = (report.get("train") or {}).get("best_valid_ndcg@10")
            if best is not None:
                metrics["valid_ndcg@10_early_stopping"] = best
        version = Registry(registry).register(out / "model", method="sft", metrics=metrics, config=report["config"],
                                              data_window=DataWindow(**report["train_window"]), activate=True)
        report["version"] = version.version
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report
