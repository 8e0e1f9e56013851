"""Training the sequence model: it learns a memorisable set, early-stops, resumes; the Recommender contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragonrec.data import leave_one_out
from dragonrec.data.splits import EvalCases
from dragonrec.data.stats import interaction_density, suggest_max_len
from dragonrec.model import ItemTokenizer, SeqRecConfig, SeqRecLM
from dragonrec.model.lm import pad_batch
from dragonrec.model.trainer import SFTConfig, encode_sequences, train_sft
from dragonrec.recommenders.sequential import GenerativeRecommender, SequentialConfig, SequentialRecommender

N_ITEMS = 15


def chain_sequences(n_users: int = 60, length: int = 6, seed: int = 0):
    """Each user walks item k -> k+1 (mod N_ITEMS) from a random start: the next item is always obvious."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start = int(rng.integers(N_ITEMS))
        seqs.append((np.array([(start + t) % N_ITEMS for t in range(length)]), np.array(["purchase"] * length)))
    return seqs


def tiny(**kw) -> SeqRecConfig:
    return SeqRecConfig(**{"hidden_size": 32, "num_layers": 1, "max_len": 10, "emb_dropout": 0.0,
                           "hidden_dropout": 0.0, **kw})


def fast(**kw) -> SFTConfig:
    return SFTConfig(**{"lr": 1e-2, "batch_size": 16, "max_epochs": 15, "eval_every": 1, "patience": 30,
                        "warmup_steps": 5, "progress": False, "max_minutes": None, **kw})


def chain_valid(n: int = 20, seed: int = 1) -> EvalCases:
    seqs = chain_sequences(n, 5, seed)
    return EvalCases(np.array([f"v{i}" for i in range(n)], dtype=object), [s[:-1] for s, _ in seqs],
                     [a[:-1] for _, a in seqs], np.array([s[-1] for s, _ in seqs]))


def test_windows_cover_long_sequences_without_padding_targets():
    tok = ItemTokenizer.from_train(np.arange(N_ITEMS), N_ITEMS)
    data = encode_sequences(tok, [(np.arange(N_ITEMS), None)], max_len=6)
    assert all(len(t) <= 6 for t, _ in data)
    targets = sorted(int(tok.vocab.catalog_index[lab]) for _, labels in data for lab in labels if lab >= 0)
    assert targets == list(range(N_ITEMS))  # every item is a target exactly once ([BOS] predicts the first)


@pytest.mark.parametrize("narrative", [False, True])
def test_tiny_model_learns_a_memorisable_sequence_set(narrative):
    torch.manual_seed(0)
    seqs = chain_sequences()
    tok = ItemTokenizer.from_train(np.arange(N_ITEMS), N_ITEMS)
    model = SeqRecLM(tiny(narrative=narrative), tok.n_items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = train_sft(model, tok, seqs, valid=chain_valid(), cfg=fast())
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.best_ndcg > 0.9
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("embed_tokens" in k for k in changed) and any("layers.0" in k for k in changed)
    # the next item of an unseen walk is ranked first among items not in the history
    hist = np.array([3, 4, 5, 6])
    scores = model.score_items(pad_batch([tok.encode(hist, ["purchase"] * 4, narrative=narrative)]))[0]
    scores[tok.item_ids(hist)] = -torch.inf
    best = int(scores.argmax())
    assert tok.vocab.catalog_index[best] == 7


def test_early_stopping_keeps_the_best_weights_and_checkpoints_resume(tmp_path):
    torch.manual_seed(0)
    seqs = chain_sequences()
    tok = ItemTokenizer.from_train(np.arange(N_ITEMS), N_ITEMS)
    model = SeqRecLM(tiny(), tok.n_items)
    res = train_sft(model, tok, seqs, valid=chain_valid(), cfg=fast(max_epochs=3, checkpoint_dir=str(tmp_path)))
    assert res.epochs == 3 and len(res.history) == 3
    assert (tmp_path / "best" / "model.safetensors").exists() and (tmp_path / "last" / "trainer.json").exists()
    best = SeqRecLM.from_pretrained(tmp_path / "best").eval()
    ids = pad_batch([tok.encode(np.array([1, 2]))])
    torch.testing.assert_close(best.score_items(ids), model.eval().score_items(ids))  # ends on the best weights
    # resume: a new run with more epochs continues after epoch 3 instead of starting over
    model2 = SeqRecLM(tiny(), tok.n_items)
    res2 = train_sft(model2, tok, seqs, valid=chain_valid(), cfg=fast(max_epochs=5, checkpoint_dir=str(tmp_path)))
    assert [h["epoch"] for h in res2.history] == [1, 2, 3, 4, 5]
    assert res2.best_ndcg >= res.best_ndcg


def test_training_without_targets_is_an_error():
    tok = ItemTokenizer.from_train(np.arange(3), 5)
    with pytest.raises(ValueError, match="no training sequence"):
        train_sft(SeqRecLM(tiny(), tok.n_items), tok, [(np.array([4]), None)], cfg=fast())


@pytest.fixture(scope="module")
def chain_split():
    import tempfile
    from pathlib import Path

    from conftest import chain_events, chain_items

    from dragonrec.data import load_dataset

    d = Path(tempfile.mkdtemp())
    chain_items().to_parquet(d / "items.parquet")
    chain_events(n_users=80).to_parquet(d / "interactions.parquet")
    ds = load_dataset(d)
    return ds, leave_one_out(ds.events)


def rec_cfg(**kw) -> SequentialConfig:
    return SequentialConfig(**{**tiny().model_dump(), **fast(max_epochs=40).model_dump(), "text_cache_dir": None,
                               **kw})


def test_recommender_fits_scores_and_round_trips(chain_split, tmp_path):
    from dragonrec.evaluate import evaluate_cases

    ds, split = chain_split
    model = SequentialRecommender(rec_cfg()).fit(split.train, ds.catalog, valid=split.valid)
    scores = model.score(split.test.histories[:5], split.test.actions[:5])
    assert scores.shape == (5, len(ds.catalog)) and scores.dtype == np.float32
    res = evaluate_cases(model, split.test, train=split.train)
    assert res["metrics"]["hr@5"] >= 0.9
    model.save(tmp_path)
    back = SequentialRecommender.load(tmp_path, ds.catalog)
    np.testing.assert_array_equal(back.score(split.test.histories[:5]), scores)
    with pytest.raises(RuntimeError, match="not fitted"):
        SequentialRecommender().score([np.array([1])])


def test_id_only_model_gives_minus_inf_to_items_it_never_saw(chain_split):
    ds, split = chain_split
    train = split.train[split.train["item_idx"] != 3]
    model = SequentialRecommender(rec_cfg(max_epochs=2)).fit(train, ds.catalog)
    scores = model.score([np.array([1, 2])])
    assert scores[0, 3] == -np.inf and np.isfinite(np.delete(scores[0], 3)).all()


def test_generative_recommends_an_item_never_seen_in_training(chain_split, monkeypatch):
    """Item 3 is held out of training; its text vector equals item 9's, which follows 8 in every walk.
    The text projection learned on item 9 carries over, so after [.., 8] item 3 ranks near the top."""
    import dragonrec.recommenders.sequential as seq

    ds, split = chain_split
    text = np.eye(len(ds.catalog), 384, dtype=np.float32)
    text[3] = text[9]
    monkeypatch.setattr(seq, "item_text_embeddings", lambda catalog, cache_dir=None: text)
    train = split.train[split.train["item_idx"] != 3]
    model = GenerativeRecommender(rec_cfg(use_text=True)).fit(train, ds.catalog)
    assert model.tokenizer.n_trained == len(ds.catalog) - 1
    scores = model.score([np.array([6, 7, 8])])[0]
    assert np.isfinite(scores).all()
    assert 3 in model.recommend(np.array([6, 7, 8]), n=2)
    assert scores[3] > np.median(scores)


def test_item_text_that_cannot_tell_items_apart_falls_back_to_ids(chain_split, monkeypatch, tmp_path):
    """Every item with the same text (an empty or templated catalog): the text path is switched off, the
    model is the ID-only one, it still learns the chain, and the saved model says so."""
    import dragonrec.recommenders.sequential as seq

    ds, split = chain_split
    same = np.tile(np.eye(1, 384, dtype=np.float32), (len(ds.catalog), 1))
    monkeypatch.setattr(seq, "item_text_embeddings", lambda catalog, cache_dir=None: same)
    model = GenerativeRecommender(rec_cfg(use_text=True, cold_head=True)).fit(split.train, ds.catalog)
    assert model.text_fallback == f"1 distinct item texts among {len(ds.catalog)} items"
    assert not model.cfg.use_text and model.model.text_proj is None and model.model.cold_proj is None
    assert model.recommend(np.array([5, 6, 7]), n=1) == [8]
    model.save(tmp_path / "m")
    assert not GenerativeRecommender.load(tmp_path / "m", ds.catalog).cfg.use_text
    assert seq.uninformative_text(np.eye(len(ds.catalog), 384)) is None


def test_generative_with_text_switched_off_is_the_id_only_model(chain_split):
    """A search may choose use_text=False for the generative model: its cold head goes with the text path."""
    ds, split = chain_split
    model = GenerativeRecommender(rec_cfg(use_text=False, cold_head=True)).fit(split.train, ds.catalog)
    assert not model.cfg.cold_head and model.model.text_proj is None and model.model.cold_proj is None
    assert model.recommend(np.array([5, 6, 7]), n=1) == [8]


def test_max_len_from_the_training_history_lengths(chain_split):
    ds, split = chain_split
    lengths = split.train.groupby("user_id").size().to_numpy()
    model = SequentialRecommender(rec_cfg(max_len_auto=True, max_epochs=1)).fit(split.train, ds.catalog)
    assert model.cfg.max_len == model.model.cfg.max_len == suggest_max_len(lengths)
    assert SequentialRecommender(rec_cfg(max_epochs=1)).fit(split.train, ds.catalog).cfg.max_len == rec_cfg().max_len


def test_dropout_from_the_density_of_the_training_interactions(chain_split):
    """`dropout_auto`: the chain data is dense (15 items, every user meets several), so the dense dropout replaces
    the configured one; a dataset below the density threshold keeps it; an explicit dropout switches the rule off."""
    from dragonrec.recommenders import build

    ds, split = chain_split
    density = interaction_density(split.train)
    assert density > 0.2
    model = SequentialRecommender(rec_cfg(dropout_auto=True, emb_dropout=0.5, hidden_dropout=0.4, max_epochs=1))
    model.fit(split.train, ds.catalog)
    assert (model.cfg.emb_dropout, model.cfg.hidden_dropout) == (0.2, 0.2)
    assert model.model.cfg.emb_dropout == 0.2 and model.model.emb_drop.p == 0.2
    sparse = rec_cfg(dropout_auto=True, emb_dropout=0.5, hidden_dropout=0.4, dense_density=density + 1e-6)
    assert sparse.adapted_to(split.train) == (sparse, [])
    # both sequence models' defaults adapt; a dropout set by hand (or by a search's trial) is kept as given
    assert build("generative").cfg.dropout_auto and build("sasrec").cfg.dropout_auto
    assert not build("sasrec", {"emb_dropout": 0.3}).cfg.dropout_auto
    assert not build("generative", {"hidden_dropout": 0.5}).cfg.dropout_auto
    assert build("generative", {"hidden_dropout": 0.5, "dropout_auto": True}).cfg.dropout_auto


def test_several_action_types_switch_on_narrative_mode(chain_split):
    ds, split = chain_split
    train = split.train.copy()
    train.loc[train.index % 3 == 0, "action"] = "view"
    model = SequentialRecommender(rec_cfg(max_epochs=2)).fit(train, ds.catalog)
    assert model.cfg.narrative and model.model.cfg.narrative
    assert model.score(split.test.histories[:2], split.test.actions[:2]).shape == (2, len(ds.catalog))
    assert model.score(split.test.histories[:2]).shape == (2, len(ds.catalog))  # actions unknown: still scores




def test_refit_with_valid_trains_on_validation_targets_for_the_chosen_epochs(chain_split):
    ds, split = chain_split
    train = split.train[split.train["item_idx"] != 3]  # item 3 now appears only as a validation target
    assert 3 in set(split.valid.targets)
    model = SequentialRecommender(rec_cfg(max_epochs=4, eval_every=1, patience=4, refit_with_valid=True))
    model.fit(train, ds.catalog, valid=split.valid)
    assert model.tokenizer.item_ids(np.array([3]))[0] >= 0  # the refit saw it
    assert np.isfinite(model.score([np.array([1, 2])])[0, 3])
    first = [h for h in model.result.history if "ndcg@10" in h]
    assert first and model.result.best_epoch == max(first, key=lambda h: h["ndcg@10"])["epoch"]


def test_generate_writes_only_real_distinct_allowed_items(chain_split):
    ds, split = chain_split
    model = SequentialRecommender(rec_cfg(max_epochs=15)).fit(split.train, ds.catalog)
    history = split.test.histories[0]
    scores = model.score([history])[0]
    scores[history] = -np.inf
    exclude = [int(np.argsort(-scores)[1])]  # bar the second-best item
    recs = model.generate(history, n=5, exclude=exclude)
    assert len(recs) == 5 == len(set(recs))
    assert all(0 <= r < len(ds.catalog) for r in recs)
    assert not set(recs) & set(history.tolist()) and exclude[0] not in recs
    assert recs[0] == int(np.argmax(scores))  # greedy starts where the full ranking starts
    assert len(set(model.generate(history, n=4, num_beams=3))) == 4


def test_load_refuses_another_catalog(chain_split, tmp_path):
    ds, split = chain_split
    model = SequentialRecommender(rec_cfg(max_epochs=1)).fit(split.train, ds.catalog)
    model.save(tmp_path)
    from dragonrec.data import Catalog

    shuffled = Catalog(ds.catalog.items.iloc[::-1].reset_index(drop=True))
    with pytest.raises(ValueError, match="another catalog"):
        SequentialRecommender.load(tmp_path, shuffled)
