"""The hyper-parameter search: its budget, validation only, reproducible, saved; the trainer's callback; the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dragonrec.data import leave_one_out
from dragonrec.data.splits import EvalCases, Split
from dragonrec.data.stats import interaction_density, suggest_dropout, suggest_max_len
from dragonrec.tune import TuneConfig, gain_guard, load_tuned, search, search_space

# Tiny models that still learn the chain in a few epochs; every trial takes well under a second.
FAST = {"max_epochs": 4, "eval_every": 1, "progress": False, "warmup_steps": 5}


@pytest.fixture
def chain_split(chain_dataset):
    return leave_one_out(chain_dataset.events)


def quiet_search(split, catalog, recommender="sasrec", overrides=None, **tune):
    return search(split, catalog, recommender, TuneConfig(**{"startup_trials": 2, **tune}),
                  {**FAST, **(overrides or {})} if recommender != "cooccurrence" else overrides, quiet=True)


def test_suggest_max_len_covers_a_percentile_of_histories():
    lengths = np.arange(1, 101)  # the 95th percentile is 95.05 events
    assert suggest_max_len(lengths, percentile=95) == 104  # 96 events + [BOS] = 97, up to a multiple of 8
    assert suggest_max_len(lengths, percentile=95, tokens_per_event=2) == 200  # 96 * 2 + 1 = 193 -> 200
    assert suggest_max_len(lengths, percentile=50) == 56  # 51 + 1 -> 56
    assert suggest_max_len([1, 2, 3]) == 16  # bounded below
    assert suggest_max_len([5000] * 10) == 256  # bounded above
    assert suggest_max_len([]) == 16
    with pytest.raises(ValueError):
        suggest_max_len(lengths, percentile=0)


def test_suggest_dropout_follows_the_density_of_interactions():
    events = pd.DataFrame({"user_id": ["a", "a", "a", "b", "b"], "item_idx": [0, 1, 1, 1, 2]})
    assert interaction_density(events) == pytest.approx(4 / 6)  # 4 distinct pairs of 2 users x 3 items
    assert interaction_density(events.iloc[:0]) == 0.0
    assert suggest_dropout(0.063, sparse=0.5) == 0.2  # ml-100k: dense
    assert suggest_dropout(0.0007, sparse=0.5) == 0.5  # Amazon Beauty: sparse keeps the configured value
    assert suggest_dropout(0.01, sparse=0.5, dense=0.1) == 0.1  # at the threshold: dense
    with pytest.raises(ValueError):
        suggest_dropout(1.5, sparse=0.5)


def test_a_searchs_default_trial_is_the_default_as_it_trains_on_that_data(chain_split):
    """Trial 0 carries the data-driven defaults resolved on the training events: the chain data is dense, so the
    default's dropout there is the dense one (0.2), not the configured one (generative 0.5, sasrec 0.3)."""
    from dragonrec.tune import default_params

    split = chain_split
    space = search_space("generative", split.train)
    assert default_params("generative", space)["emb_dropout"] == 0.5
    resolved = default_params("generative", space, split.train)
    assert resolved["emb_dropout"] == resolved["hidden_dropout"] == 0.2
    sasrec_space = search_space("sasrec", split.train)
    assert default_params("sasrec", sasrec_space)["emb_dropout"] == 0.3
    assert default_params("sasrec", sasrec_space, split.train)["emb_dropout"] == 0.2


def test_train_sft_callback_sees_every_validation_and_can_stop(chain_dataset, chain_split):
    from dragonrec.recommenders.sequential import SequentialConfig, SequentialRecommender

    seen = []
    model = SequentialRecommender(SequentialConfig(hidden_size=16, num_layers=1, max_epochs=6, eval_every=1,
                                                   refit_with_valid=False, quiet=True, max_minutes=None))
    model.on_eval = lambda epoch, ndcg: seen.append((epoch, ndcg)) or epoch >= 3
    model.fit(chain_split.train, chain_dataset.catalog, valid=chain_split.valid)
    assert model.result.stopped == "callback" and model.result.epochs == 3
    assert [e for e, _ in seen] == [1, 2, 3]
    assert [n for _, n in seen] == [h["ndcg@10"] for h in model.result.history]


def test_search_obeys_its_trial_budget(chain_dataset, chain_split):
    result = quiet_search(chain_split, chain_dataset.catalog, trials=3, minutes=5, min_gain_se=0)
    assert len(result.trials) == 3 and result.stopped == "trials"
    assert result.best_trial is not None and 0 < result.best_value <= 1
    best = result.trials[result.best_trial]
    assert best["state"] == "COMPLETE" and best["value"] == result.best_value
    assert all(t["value"] <= result.best_value for t in result.trials if t["state"] == "COMPLETE")


def test_search_obeys_its_time_budget_and_cuts_the_last_trial(chain_dataset, chain_split):
    quiet_search(chain_split, chain_dataset.catalog, trials=1)  # imports and first-call costs out of the timing
    budget_s = 4.0
    t0 = time.perf_counter()
    # Every trial would train 100,000 epochs (patience too): only the budget can end this search.
    result = quiet_search(chain_split, chain_dataset.catalog, overrides={"max_epochs": 100_000, "patience": 100_000},
                          trials=1000, minutes=budget_s / 60, min_trial_seconds=0.5, trial_share=0.5)
    elapsed = time.perf_counter() - t0
    assert elapsed < budget_s + 2.0  # at most one epoch, its validation and a model build over
    assert result.stopped == "time" and 2 <= len(result.trials) < 1000
    assert all(t["cut"] and t["stopped"] == "time" for t in result.trials)
    assert all(t["seconds"] < 0.5 * budget_s + 1.0 for t in result.trials)  # no trial takes the whole budget
    assert sum(t["seconds"] for t in result.trials) <= elapsed


def test_pruner_stops_trials_that_fall_behind(chain_dataset, chain_split):
    result = quiet_search(chain_split, chain_dataset.catalog, overrides={"max_epochs": 6}, trials=8, minutes=5,
                          prune_after_trials=1, warmup_epochs=0)
    pruned = [t for t in result.trials if t["state"] == "PRUNED"]
    assert pruned, "no trial was pruned"
    assert all(t["stopped"] == "callback" and t["epochs"] < 6 for t in pruned)
    assert result.trials[result.best_trial]["state"] == "COMPLETE"


def _poisoned(split: Split, n_items: int) -> Split:
    """The same split whose test cases name items that do not exist: any use of them fails or changes a value."""
    bad = np.full(len(split.test), 10**9, dtype=np.int64)
    test = EvalCases(split.test.user_ids, [h + 10**9 for h in split.test.histories], split.test.actions, bad,
                     split.test.target_actions, split.test.target_times, split.test.previous_times)
    return Split(split.name, split.train, split.valid, test, split.slices, split.valid_slices, split.info)


@pytest.mark.parametrize("recommender", ["sasrec", "cooccurrence"])
def test_search_reads_validation_only(chain_dataset, chain_split, recommender, monkeypatch):
    from dragonrec import tune as tune_module
    from dragonrec.evaluate import runner
    from dragonrec.model import trainer

    scored = []  # the targets of every case set a trial is scored on
    init, evaluate = trainer.ValidationSet.__init__, runner.evaluate_cases

    def spy_init(self, tokenizer, histories, actions, targets, *a, **kw):
        scored.append(np.asarray(targets))
        init(self, tokenizer, histories, actions, targets, *a, **kw)

    def spy_evaluate(model, cases, **kw):
        scored.append(np.asarray(cases.targets))
        return evaluate(model, cases, **kw)

    per_case = tune_module.ndcg_per_case

    def spy_per_case(model, cases, **kw):  # the objective and the guard score the fitted model here
        scored.append(np.asarray(cases.targets))
        return per_case(model, cases, **kw)

    monkeypatch.setattr(trainer.ValidationSet, "__init__", spy_init)
    monkeypatch.setattr(runner, "evaluate_cases", spy_evaluate)
    monkeypatch.setattr(tune_module, "ndcg_per_case", spy_per_case)
    catalog = chain_dataset.catalog
    clean = quiet_search(chain_split, catalog, recommender, trials=3, minutes=5)
    n_clean = len(scored)
    poisoned = quiet_search(_poisoned(chain_split, len(catalog)), catalog, recommender, trials=3, minutes=5)
    assert n_clean >= 3 and len(scored) == 2 * n_clean
    assert all(np.array_equal(t, chain_split.valid.targets) for t in scored)
    assert [t["value"] for t in poisoned.trials] == [t["value"] for t in clean.trials]


def test_same_seed_same_trials(chain_dataset, chain_split):
    runs = [quiet_search(chain_split, chain_dataset.catalog, trials=4, minutes=5, seed=s) for s in (7, 7, 8)]
    a, b, c = ([(t["params"], t["value"], t["state"]) for t in r.trials] for r in runs)
    assert a == b
    assert [p for p, _, _ in a[1:]] != [p for p, _, _ in c[1:]]  # trial 0 is the default either way


def test_first_trial_is_the_default_and_the_space_fits_the_data(chain_dataset, chain_split):
    from dragonrec.recommenders import build

    space = search_space("generative", chain_split.train)
    assert {"hidden_size", "num_layers", "emb_dropout", "hidden_dropout", "lr", "max_len", "id_dropout",
            "weight_decay", "use_text"} <= set(space)
    assert set(space["use_text"].choices) == {True, False}  # IDs alone is always a candidate
    assert {"id_dropout", "use_text"}.isdisjoint(search_space("sasrec", chain_split.train))
    long = chain_split.train.loc[np.repeat(chain_split.train.index, 40)]  # histories of about 160 events
    assert space["max_len"].high == 50 and search_space("sasrec", long)["max_len"].high > 150
    result = quiet_search(chain_split, chain_dataset.catalog, trials=1, minutes=5)
    default = build("sasrec").cfg.adapted_to(chain_split.train)[0]  # as it trains on this data (dense: dropout 0.2)
    assert result.trials[0]["params"] == {k: getattr(default, k) for k in result.trials[0]["params"]}
    fixed = quiet_search(chain_split, chain_dataset.catalog, overrides={"hidden_size": 16}, trials=2, minutes=5)
    assert "hidden_size" not in fixed.space and all("hidden_size" not in t["params"] for t in fixed.trials)
    assert fixed.overrides()["hidden_size"] == 16


def test_cli_tune_saves_registers_and_reloads_the_tuned_model(chain_dir, chain_dataset, tmp_path):
    from dragonrec.cli import app
    from dragonrec.recommenders import build
    from dragonrec.recommenders.sequential import SequentialRecommender
    from dragonrec.registry import Registry

    out, registry = tmp_path / "tune", tmp_path / "registry"
    sets = [x for k, v in FAST.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    result = CliRunner().invoke(app, ["tune", "--data", str(chain_dir), "--out", str(out), "--recommender", "sasrec",
                                      "--trials", "3", "--minutes", "2", "--registry", str(registry), *sets])
    assert result.exit_code == 0, result.output
    tuned = json.loads((out / "tuned_config.json").read_text())
    assert len(tuned["trials"]) == 3 and tuned["best_trial"] is not None and tuned["dataset"] == "chain"
    assert {"params", "value", "state", "seconds"} <= set(tuned["trials"][0])
    assert "valid ndcg@10" in result.output and "ndcg@10" in result.output
    # The saved model holds exactly the configuration the search chose (its checkpoint place aside).
    name, overrides = load_tuned(out / "model")
    saved = SequentialRecommender.load(out / "model", chain_dataset.catalog).cfg.model_dump()
    rebuilt = build(name, overrides).cfg.model_dump()
    assert {k: v for k, v in saved.items() if k != "checkpoint_dir"} == \
        {k: v for k, v in rebuilt.items() if k != "checkpoint_dir"}
    assert all(saved[k] == v for k, v in tuned["best_params"].items())
    report = json.loads((out / "report.json").read_text())
    assert report["tuning"]["best_trial"] == tuned["best_trial"] and "ndcg@10" in report["test"]
    version = Registry(registry).active()
    assert version.version == report["version"]
    assert "tuned_config.json" in version.info.files


def test_cli_tune_cooccurrence_without_a_saved_model(chain_dir, tmp_path):
    from dragonrec.cli import app

    out = tmp_path / "cooc"
    result = CliRunner().invoke(app, ["tune", "--data", str(chain_dir), "--out", str(out), "--recommender",
                                      "cooccurrence", "--trials", "4", "--minutes", "1"])
    assert result.exit_code == 0, result.output
    tuned = json.loads((out / "tuned_config.json").read_text())
    assert len(tuned["trials"]) == 4 and set(tuned["best_params"]) >= {"window", "last_n"}
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["window"] == tuned["best_params"]["window"]
    bad = CliRunner().invoke(app, ["tune", "--data", str(chain_dir), "--out", str(out), "--recommender", "popularity"])
    assert bad.exit_code != 0


def test_the_guard_keeps_the_default_unless_the_gain_is_beyond_noise():
    rng = np.random.default_rng(0)
    default = rng.random(1000)
    noisy = default + rng.normal(0.0, 0.2, 1000) + 0.002  # a tiny gain in a lot of noise
    real = default + rng.normal(0.0, 0.2, 1000) + 0.05
    g = gain_guard(default, noisy, 2.0)
    assert g["kept_default"] and abs(g["gain"] - 0.002) < 0.02 and g["se"] > 0
    assert not gain_guard(default, real, 2.0)["kept_default"]
    assert gain_guard(default, noisy, 0.0)["kept_default"] == (g["gain"] < 0)  # 0: the better mean wins


def test_a_search_keeps_the_default_when_no_trial_beats_it_beyond_noise(chain_dataset, chain_split):
    from dragonrec.evaluate.metrics import ndcg_at_k, target_ranks
    from dragonrec.recommenders import build
    from dragonrec.tune import ndcg_per_case

    kept = quiet_search(chain_split, chain_dataset.catalog, trials=3, minutes=5, min_gain_se=1e9)
    assert kept.best_trial == 0 and kept.best_params == kept.trials[0]["params"]
    assert kept.guard == {} or kept.guard["kept_default"]
    free = quiet_search(chain_split, chain_dataset.catalog, trials=3, minutes=5, min_gain_se=0)
    assert free.best_value == max(t["value"] for t in free.trials if t["state"] == "COMPLETE")
    # the per-case scores the guard compares average to the evaluation's NDCG@10
    model = build("cooccurrence").fit(chain_split.train, chain_dataset.catalog)
    v = chain_split.valid
    ranks = target_ranks(model.score(v.histories, v.actions), v.targets, exclude=v.histories)
    assert abs(ndcg_per_case(model, v).mean() - ndcg_at_k(ranks, 10)) < 1e-9
