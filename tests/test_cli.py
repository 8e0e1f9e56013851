"""The command line: every command documented, `evaluate` end to end on a tiny dataset."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dragonrec.cli import app
from dragonrec.evaluate.metrics import ndcg_at_k

runner = CliRunner()


def test_every_command_has_help_with_an_example():
    import typer.main

    group = typer.main.get_command(app)
    assert group.commands, "no commands"
    for name, cmd in group.commands.items():
        assert cmd.help and "Example:" in cmd.help, f"command {name} is undocumented"
        for sub in getattr(cmd, "commands", {}).values():
            assert sub.help and "Example:" in sub.help, f"command {name} {sub.name} is undocumented"


def test_evaluate_writes_report(chain_dir, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--recommender", "cooccurrence",
                                 "--set", "window=1", "--set", "last_n=1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["window"] == 1
    assert report["dataset"]["events"] == 360 and report["dataset"]["items"] == 12
    assert set(report["test"]) >= {"ndcg@10", "hr@10", "hr@5", "ndcg@20", "mrr"}
    assert report["test"]["hr@10"] == 1.0  # the chain is obvious to co-occurrence
    assert "cold_user" in report["test_slices"] and "coverage@10" in report["test_beyond"]
    assert "ndcg@10" in result.output
    # each case's target rank, in the split's order, is what the metrics were computed from
    assert len(report["test_ranks"]) == report["split"]["test_cases"]
    assert ndcg_at_k(np.asarray(report["test_ranks"]), 10) == pytest.approx(report["test"]["ndcg@10"])


def test_two_models_compare_case_by_case_on_the_same_split(chain_dir, tmp_path):
    """`bench_tune.py paired`: the mean per-case difference with its standard error, from the reports' ranks."""
    paths = {}
    for name in ("cooccurrence", "popularity"):
        paths[name] = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--recommender", name, "--quiet",
                                     "--output", str(paths[name])])
        assert result.exit_code == 0, result.output
    out = tmp_path / "paired.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tune.py"
    run = subprocess.run([sys.executable, str(bench), "paired", "--a", str(paths["cooccurrence"]),
                          "--b", str(paths["popularity"]), "--out", str(out)], check=False,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    res = json.loads(out.read_text())
    reports = {k: json.loads(v.read_text()) for k, v in paths.items()}
    assert res["a_ndcg@10"] == pytest.approx(reports["cooccurrence"]["test"]["ndcg@10"])
    assert res["b_ndcg@10"] == pytest.approx(reports["popularity"]["test"]["ndcg@10"])
    assert res["difference"] == pytest.approx(res["b_ndcg@10"] - res["a_ndcg@10"]) and res["difference"] < 0
    assert res["se"] > 0 and res["ci95"][1] < 0  # co-occurrence reads the chain, popularity cannot
    # reports of another split are refused
    other = json.loads(paths["popularity"].read_text())
    other["test_ranks"] = other["test_ranks"][:-1]
    paths["popularity"].write_text(json.dumps(other))
    run = subprocess.run([sys.executable, str(bench), "paired", "--a", str(paths["cooccurrence"]),
                          "--b", str(paths["popularity"])], check=False, capture_output=True, text=True)
    assert run.returncode != 0 and "not on one split" in run.stderr


def test_a_summary_merges_the_seeds_of_an_earlier_one(chain_dir, tmp_path):
    """`bench_tune.py summary --merge`: seeds of an earlier summary whose reports are gone are kept beside the new
    reports (a report of the same seed replaces its earlier run); a summary of another model is refused."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tune.py"
    reports = []
    for seed in (0, 1, 2):
        reports.append(tmp_path / f"cooc_s{seed}.json")
        result = runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--recommender", "cooccurrence", "--quiet",
                                     "--seed", str(seed), "--output", str(reports[-1])])
        assert result.exit_code == 0, result.output

    def summary(*paths, merge=None, out="summary.json"):
        cmd = [sys.executable, str(bench), "summary", "--defaults", *map(str, paths), "--out", str(tmp_path / out)]
        run = subprocess.run(cmd + (["--merge", str(tmp_path / merge)] if merge else []), check=False,
                             capture_output=True, text=True)
        return run, (json.loads((tmp_path / out).read_text()) if run.returncode == 0 else None)

    run, first = summary(reports[0], reports[1], out="first.json")
    assert run.returncode == 0, run.stderr
    reports[0].unlink()  # runs/ is not kept: seed 0's report is gone, its line in the summary stays
    run, merged = summary(reports[1], reports[2], merge="first.json")
    assert run.returncode == 0, run.stderr
    runs = merged["default"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and runs[0] == first["default"]["runs"][0]
    assert merged["default"]["test_ndcg@10"]["n"] == 3
    values = [r["test_ndcg@10"] for r in runs]
    assert merged["default"]["test_ndcg@10"]["mean"] == pytest.approx(sum(values) / 3)
    other = tmp_path / "pop.json"
    assert runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--recommender", "popularity", "--quiet",
                               "--output", str(other)]).exit_code == 0
    run, _ = summary(other, merge="first.json", out="bad.json")
    assert run.returncode != 0 and "--merge" in run.stderr
    # a search that kept the default (trial 0): the tuned entry is the default's fits, marked so
    search = {"dataset": "chain", "recommender": "cooccurrence", "split": "loo", "ties": "keep", "seconds": 1.0,
              "stopped": "trials", "best_trial": 0, "best_value": 0.1, "best_params": {}, "guard": None,
              "fixed": {}, "space": {}, "tune": {}, "trials": []}
    (tmp_path / "tuned_config.json").write_text(json.dumps(search))
    run = subprocess.run([sys.executable, str(bench), "summary", "--tuned-config", str(tmp_path / "tuned_config.json"),
                          "--defaults", str(reports[1]), str(reports[2]), "--merge", str(tmp_path / "first.json"),
                          "--out", str(tmp_path / "kept.json")], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert kept["tuned"]["same_as_default"] and kept["tuned"]["runs"] == kept["default"]["runs"] == runs


def test_evaluate_reports_bad_input_clearly(tmp_path):
    (tmp_path / "interactions.csv").write_text("user_id,item_id\nu,i\n")
    result = runner.invoke(app, ["evaluate", "--data", str(tmp_path)])
    assert result.exit_code != 0
    assert "missing column: timestamp" in str(result.exception)


def test_evaluate_rejects_unknown_split(chain_dir):
    result = runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--split", "random"])
    assert result.exit_code != 0


def test_train_sft_saves_registers_and_evaluates_the_model(chain_dir, tmp_path):
    tiny = ["--set", "hidden_size=16", "--set", "num_layers=1", "--set", "max_epochs=3", "--set", "eval_every=1",
            "--set", "progress=false", "--set", "max_minutes=null"]
    out, registry = tmp_path / "run", tmp_path / "registry"
    result = runner.invoke(app, ["train", "sft", "--data", str(chain_dir), "--out", str(out), "--recommender", "sasrec",
                                 "--registry", str(registry), *tiny])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == "v0001" and "ndcg@10" in report["test"]
    from dragonrec.registry import Registry

    active = Registry(registry).active()
    assert active.version == "v0001" and active.info.method == "sft"
    assert active.info.metrics["valid_ndcg@10"] == report["valid"]["ndcg@10"]
    assert not any(k.startswith("test") for k in active.info.metrics)  # test numbers live in reports only
    assert active.info.data_window.n_events == report["split"]["train_events"] > 0
    assert (active.path / "provenance.json").exists() and (active.path / "trained_events.npy").exists()
    again = runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--model", str(active.path),
                                "--output", str(tmp_path / "e.json")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "e.json").read_text())["test"] == report["test"]  # the saved model, not a refit
    # another split of the same data holds out events the model trained on: refused, with the reason
    other = runner.invoke(app, ["evaluate", "--data", str(chain_dir), "--model", str(active.path), "--split", "time"])
    assert other.exit_code != 0
    assert "was trained on" in str(other.exception) and "test targets" in str(other.exception)


def test_train_sft_refuses_to_resume_checkpoints_of_another_split(chain_dir, tmp_path):
    tiny = ["--set", "hidden_size=16", "--set", "num_layers=1", "--set", "max_epochs=2", "--set", "eval_every=1",
            "--set", "max_minutes=null", "--set", "refit_with_valid=false", "--quiet"]
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", "sft", "--data", str(chain_dir), "--out", str(out), "--recommender",
                                "sasrec", *tiny])
    assert first.exit_code == 0, first.output
    assert (out / "checkpoints" / "provenance.json").exists()
    second = runner.invoke(app, ["train", "sft", "--data", str(chain_dir), "--out", str(out), "--recommender",
                                 "sasrec", "--ties", "shuffle", *tiny])
    assert second.exit_code != 0
    assert "checkpoints of another run" in str(second.exception) and "ties" in str(second.exception)


def test_train_sft_logs_plain_lines_when_not_a_terminal(chain_dir, tmp_path, capfd):
    from dragonrec.train.sft import run_sft

    run_sft(chain_dir, tmp_path / "run", recommender="sasrec",
            overrides={"hidden_size": 16, "num_layers": 1, "max_epochs": 2, "eval_every": 1, "max_minutes": None})
    err = capfd.readouterr().err
    assert "sft epoch 1/2 loss" in err and "valid ndcg@10" in err
    assert "sft refit epoch" in err and "no held-out validation (refit" in err
    assert "0.0000 (best" not in err.split("sft refit")[1]  # a refit never pretends to have a validation metric


def test_benchmark_without_training(chain_dir, tmp_path, monkeypatch):
    from dragonrec.evaluate import experiment

    monkeypatch.setattr(experiment, "DEMO_RECOMMENDERS", {"popularity": {}, "cooccurrence": {"window": 1}})
    result = runner.invoke(app, ["benchmark", "--data", str(chain_dir), "--out", str(tmp_path / "b"), "--no-train"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert set(summary) == {"popularity", "cooccurrence"}


def test_demo_trains_once_then_reuses_and_the_loop_and_models_commands(chain_dir, tmp_path):
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--data", str(chain_dir), "--out", str(out), "--train-minutes", "0.05",
                                "--no-serve"])
    assert first.exit_code == 0, first.output
    assert (out / "registry" / "active.json").exists()
    again = runner.invoke(app, ["demo", "--data", str(chain_dir), "--out", str(out), "--no-serve"])
    assert again.exit_code == 0 and "using v0001" in again.output, again.output
    listed = runner.invoke(app, ["models", "list", "--registry", str(out / "registry")])
    assert listed.exit_code == 0 and "v0001" in listed.output
    # a loop round over an empty store has nothing to learn from: skipped, the active version unchanged
    loop = runner.invoke(app, ["loop", "--data", str(chain_dir), "--store", str(tmp_path / "fb.db"),
                               "--registry", str(out / "registry"), "--method", "sft"])
    assert loop.exit_code == 0 and "skipped" in loop.output, loop.output
    refused = runner.invoke(app, ["models", "rollback", "--registry", str(out / "registry")])
    assert refused.exit_code != 0 and "nothing to roll back" in str(refused.exception)
    bad = runner.invoke(app, ["loop", "--data", str(chain_dir), "--store", str(tmp_path / "fb.db"),
                              "--registry", str(out / "registry"), "--method", "ppo"])
    assert bad.exit_code != 0


def test_pipeline_over_a_saved_model_is_checked_like_the_model(chain_dir, tmp_path):
    tiny = ["--set", "hidden_size=16", "--set", "num_layers=1", "--set", "max_epochs=2", "--set", "eval_every=1",
            "--set", "max_minutes=null", "--quiet"]
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", "sft", "--data", str(chain_dir), "--out", str(out), "--recommender",
                               "sasrec", *tiny]).exit_code == 0
    pipe = ["evaluate", "--data", str(chain_dir), "--recommender", "pipeline", "--quiet",
            "--set", 'sources={"model": 5, "cooccurrence": 5, "popularity": 2}', "--set", "model=sasrec",
            "--set", f"model_dir={out / 'model'}"]
    ok = runner.invoke(app, [*pipe, "--output", str(tmp_path / "p.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["recommender"] == "pipeline" and report["test"]["cases"] == 60
    refused = runner.invoke(app, [*pipe, "--split", "time"])
    assert refused.exit_code != 0 and "was trained on" in str(refused.exception)
