"""Cold items: the generative model's text-only cold head, its calibration on validation, new products scored
without retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragonrec.data import leave_one_out
from dragonrec.evaluate.metrics import ndcg_at_k, target_ranks
from dragonrec.model import ItemTokenizer, SeqRecConfig, SeqRecLM
from dragonrec.model.lm import IGNORE, pad_batch
from dragonrec.recommenders.sequential import GenerativeRecommender, SequentialConfig


def tiny_cfg(**kw) -> SeqRecConfig:
    return SeqRecConfig(**{"hidden_size": 16, "num_layers": 1, "num_heads": 1, "max_len": 12, "use_text": True,
                           "cold_head": True, "emb_dropout": 0.0, "hidden_dropout": 0.0, **kw})


def circle_text(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    """Item k's text vector sits at angle 2*pi*k/n (plus noise): neighbours in the chain read alike, so text
    generalises to items the model never trained on."""
    rng = np.random.default_rng(seed)
    t = np.zeros((n, dim), dtype=np.float32)
    ang = 2 * np.pi * np.arange(n) / n
    t[:, 0], t[:, 1] = np.cos(ang), np.sin(ang)
    t[:, 2:] = 0.01 * rng.normal(size=(n, dim - 2))
    return t


def test_cold_head_never_changes_the_main_path():
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(8), n_catalog=10, with_all_items=True)
    model = SeqRecLM(tiny_cfg(), tok.n_items, tok.n_trained, text_emb=circle_text(tok.n_items)).train()
    ids = pad_batch([tok.encode(np.array([1, 2, 3])), tok.encode(np.array([4, 5]))])
    labels = pad_batch([tok.target_labels(r.tolist()) for r in ids], IGNORE)
    mask = labels >= 0
    z = model.cold_query(model.hidden_states(ids)[mask], model.text_query(ids)[mask])
    model.cold_loss(z, labels[mask]).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"cold_proj.weight", "cold_scale", "cold_decay"}  # detached: only the head learns from it
    with pytest.raises(ValueError, match="needs use_text"):
        SeqRecLM(tiny_cfg(use_text=False), 8)


def test_uncalibrated_head_scores_like_the_model_without_it():
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(8), n_catalog=10, with_all_items=True)
    text = circle_text(tok.n_items)
    with_head = SeqRecLM(tiny_cfg(), tok.n_items, tok.n_trained, text_emb=text).eval()
    without = SeqRecLM(tiny_cfg(cold_head=False), tok.n_items, tok.n_trained, text_emb=text).eval()
    without.load_state_dict({k: v for k, v in with_head.state_dict().items() if not k.startswith("cold_")})
    ids = pad_batch([tok.encode(np.array([1, 2, 3]))])
    assert not with_head.cold_ready
    torch.testing.assert_close(with_head.score_items(ids), without.score_items(ids), rtol=0, atol=0)
    extra = with_head.score_items(ids, extra_text=torch.as_tensor(text[:2]))
    assert extra.shape == (1, tok.n_items + 2) and torch.isinf(extra[0, -2:]).all()  # no head: new items unscored


def test_calibrated_scores_are_log_probabilities_with_the_offset_on_cold_items():
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(8), n_catalog=10, with_all_items=True)
    text = circle_text(tok.n_items)
    model = SeqRecLM(tiny_cfg(), tok.n_items, tok.n_trained, text_emb=text).eval()
    model.cold_offset.fill_(-1.5)
    ids = pad_batch([tok.encode(np.array([1, 2, 3]))])
    s = model.score_items(ids, extra_text=torch.as_tensor(text[[0, 9]]))
    warm = s[0, :tok.n_trained]
    torch.testing.assert_close(torch.logsumexp(warm, 0), torch.tensor(0.0), atol=1e-5, rtol=0)  # a log-softmax
    _, text_lp = model.log_probs(*model.last_hidden(ids, with_query=True))
    torch.testing.assert_close(s[0, tok.n_trained:tok.n_items], text_lp[0, tok.n_trained:] - 1.5)
    # products added after training with the same text as model items 0 and 9 score as those would by the head
    torch.testing.assert_close(s[0, tok.n_items:], text_lp[0, [0, 9]] - 1.5)


def test_scoring_reads_the_head_logits_the_training_path_computes():
    """Without autograd the head's logits come from one [n, text_dim] read (<h W + s q, t>) through numpy's BLAS;
    with it, from [cold_proj(t), t] as trained: the same numbers up to float32 rounding."""
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(8), n_catalog=10, with_all_items=True)
    model = SeqRecLM(tiny_cfg(), tok.n_items, tok.n_trained, text_emb=circle_text(tok.n_items)).eval()
    with torch.no_grad():
        model.cold_proj.weight.normal_()  # weights far from their small initial ones, as after training
        model.cold_scale.fill_(2.0)
    ids = pad_batch([tok.encode(np.array([1, 2, 3])), tok.encode(np.array([4, 5]))])
    with torch.no_grad():
        last, query = model.last_hidden(ids, with_query=True)
        fast = model.log_probs(last, query)
    with torch.enable_grad():
        slow = model.log_probs(last, query)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def chain(chain_dataset):
    return chain_dataset, leave_one_out(chain_dataset.events)


def fit_cold(chain, monkeypatch, text: np.ndarray, **kw) -> GenerativeRecommender:
    import dragonrec.recommenders.sequential as seq

    ds, split = chain
    monkeypatch.setattr(seq, "item_text_embeddings", lambda catalog, cache_dir=None: text)
    cfg = SequentialConfig(**{"use_text": True, "cold_head": True, "cold_holdout": 0.2, "hidden_size": 32,
                              "num_layers": 1, "max_len": 10, "emb_dropout": 0.0, "hidden_dropout": 0.0,
                              "lr": 1e-2, "batch_size": 16, "max_epochs": 25, "eval_every": 5, "patience": 30,
                              "warmup_steps": 5, "progress": False, "quiet": True, "max_minutes": None,
                              "refit_with_valid": False, "text_cache_dir": None, **kw})
    return GenerativeRecommender(cfg).fit(split.train, ds.catalog, valid=split.valid)


def test_calibration_matches_a_brute_force_ranking(chain, monkeypatch):
    """The offset curve of `calibrate_cold` equals NDCG@10 computed the slow way: stand-in items scored by the
    head plus the offset, the others by the main path's log-softmax over them, history excluded."""
    ds, split = chain
    model = fit_cold(chain, monkeypatch, circle_text(len(ds.catalog)))
    cal = model.cold_calibration
    assert cal["stand_in_items"] == round(0.2 * model.tokenizer.n_trained) and cal["cold_target_cases"] > 0
    m, tok, valid = model.model, model.tokenizer, split.valid
    toks = [tok.encode(h, a, narrative=m.cfg.narrative, max_len=m.cfg.max_len)
            for h, a in zip(valid.histories, valid.actions)]
    with torch.no_grad():
        main, text_lp = m.log_probs(*m.last_hidden(pad_batch(toks), with_query=True))
    n_head = m.n_head
    warm = (main[:, :n_head] - torch.logsumexp(main[:, :n_head], 1, keepdim=True)).numpy()
    for offset in (-2.0, 0.0, 1.0):
        by_model_id = np.concatenate([warm, text_lp[:, n_head:].numpy() + offset], axis=1)
        scores = np.full((len(valid), len(ds.catalog)), -np.inf, dtype=np.float32)
        scores[:, tok.vocab.catalog_index] = by_model_id
        slow = ndcg_at_k(target_ranks(scores, valid.targets, exclude=valid.histories), 10)
        assert cal["curve"][f"{offset:.2f}"] == pytest.approx(slow, abs=1e-6)
    assert cal["ndcg@10"] == max(cal["curve"].values())
    assert m.cold_ready and float(m.cold_offset) == cal["offset"]


def test_a_new_product_is_recommended_without_retraining(chain, monkeypatch, tmp_path):
    """A product added after training, whose text reads like item 9 (which follows 8 in every walk), enters the
    top of the list after [6, 7, 8] with no retraining, and the saved model keeps the calibrated head."""
    ds, _ = chain
    text = circle_text(len(ds.catalog) + 1)
    new_text = text[-1:]
    new_text[:, :2] = text[9, :2]  # reads like item 9
    model = fit_cold(chain, monkeypatch, text[:-1])
    assert model.scores_new_items
    scores = model.score([np.array([6, 7, 8])], new_text=new_text)[0]
    assert scores.shape == (len(ds.catalog) + 1,) and np.isfinite(scores).all()
    unseen = scores.copy()
    unseen[[6, 7, 8]] = -np.inf  # the history, as lists leave it out
    assert set(np.argsort(-unseen)[:2].tolist()) == {9, len(ds.catalog)}  # the new product beside the true next
    assert scores[-1] > np.median(scores[:-1])
    model.save(tmp_path / "m")
    back = GenerativeRecommender.load(tmp_path / "m", ds.catalog)
    assert back.cold_calibration == model.cold_calibration
    np.testing.assert_allclose(back.score([np.array([6, 7, 8])], new_text=new_text)[0], scores, rtol=1e-5)


def test_the_service_ranks_a_product_added_through_the_api_with_its_model(tmp_path):
    """A shop on a real Beauty slice serving a generative model with a calibrated cold head: a product added
    through the API (a re-listing of a popular product under a new id, same text) is scored by the model at once,
    as its twin would be by the head, and reaches users' lists with no retraining and no forced slot."""
    from fastapi.testclient import TestClient
    from serve_helpers import API_KEY, beauty_slice

    from dragonrec.data import load_dataset
    from dragonrec.registry import Registry
    from dragonrec.serve import Settings, create_app

    data = beauty_slice(tmp_path / "data", n_items=300, max_users=800)
    ds = load_dataset(data)
    split = leave_one_out(ds.events)
    cfg = SequentialConfig(use_text=True, cold_head=True, hidden_size=32, num_layers=1, max_len=20, max_epochs=6,
                           eval_every=2, refit_with_valid=False, progress=False, quiet=True, max_minutes=None,
                           warmup_steps=0, batch_size=128, text_cache_dir=str(tmp_path / "emb"))
    model = GenerativeRecommender(cfg).fit(split.train, ds.catalog, valid=split.valid)
    assert model.scores_new_items
    model.save(tmp_path / "model")
    Registry(tmp_path / "state" / "registry").register(tmp_path / "model", method="sft", activate=True)
    popular = ds.events["item_idx"].value_counts().index[0]
    twin = ds.catalog.items.iloc[popular]
    settings = Settings(data_dir=data, state_dir=tmp_path / "state", api_keys=[API_KEY], reload_interval_s=0.2,
                        embedding_cache_dir=str(tmp_path / "emb"))
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service
        assert service.model_version != "popularity"
        item = {"item_id": "RELIST-1"}
        for field in ("title", "brand", "category", "price", "description"):  # every field the item text reads
            value = twin.get(field)
            if value is not None and not (isinstance(value, float) and np.isnan(value)):
                item[field] = value.item() if hasattr(value, "item") else value
        assert client.post("/v1/items", json=item, headers={"X-API-Key": API_KEY}).status_code == 201
        served = service.serving.pipeline.model
        new = len(service.catalog) - 1
        users = split.test.user_ids[:200]
        scores = served.score(split.test.histories[:200], split.test.actions[:200])
        assert np.isfinite(scores[:, new]).all()
        # by the head, the re-listing reads exactly as its twin would: same text, same score
        twin_id = model.tokenizer.item_ids(np.array([popular]))[0]
        with torch.no_grad():
            toks = pad_batch([model.tokenizer.encode(h, a, narrative=model.model.cfg.narrative, max_len=20)
                              for h, a in zip(split.test.histories[:200], split.test.actions[:200])])
            _, text_lp = model.model.log_probs(*model.model.last_hidden(toks, with_query=True))
        expected = text_lp[:, twin_id].numpy() + float(model.model.cold_offset)
        np.testing.assert_allclose(scores[:, new], expected, rtol=1e-4, atol=1e-4)
        listed = [u for u in users
                  if "RELIST-1" in [i["item_id"] for i in client.post("/v1/recommend", json={"user_id": str(u), "n": 10})
                                    .json()["items"]]]
        top10 = (np.argsort(-scores, axis=1)[:, :10] == new).any(axis=1)
        assert top10.any() and listed  # some users' lists hold it, from the model's own score


def test_cold_item_slots_bring_a_product_nobody_touched_into_lists(tmp_path):
    """`cold_item_slots=1` through the service on a real Beauty slice: a product added through the API (no user
    has touched it) takes the 10th place of lists it was not in, the other nine stay as they were; off, nothing
    moves. (The fallback pipeline: its new-product slots, `new_item_slots`, are off here.)"""
    from fastapi.testclient import TestClient
    from serve_helpers import API_KEY, beauty_slice

    from dragonrec.data import load_dataset
    from dragonrec.serve import Settings, create_app

    data = beauty_slice(tmp_path / "data", n_items=300, max_users=300)
    ds = load_dataset(data)
    twin = ds.catalog.items.iloc[int(ds.events["item_idx"].value_counts().index[0])]
    item = {"item_id": "NEW-1", **{f: str(twin[f]) for f in ("title", "brand", "category") if isinstance(twin.get(f), str)}}
    users = [str(u) for u in ds.events["user_id"].unique()[:40]]

    def lists(slots: int) -> dict[str, list[str]]:
        settings = Settings(data_dir=data, state_dir=tmp_path / f"state{slots}", api_keys=[API_KEY], new_item_slots=0,
                            cold_item_slots=slots, embedding_cache_dir=str(tmp_path / "emb"))
        with TestClient(create_app(settings)) as client:
            assert client.post("/v1/items", json=item, headers={"X-API-Key": API_KEY}).status_code == 201
            return {u: [i["item_id"] for i in client.post("/v1/recommend", json={"user_id": u, "n": 10}).json()["items"]]
                    for u in users}

    off, on = lists(0), lists(1)
    moved = [u for u in users if "NEW-1" in on[u] and "NEW-1" not in off[u]]
    assert len(moved) >= 3  # where dense retrieval proposes it (8 of these 40 users when written), the slot shows it
    for u in moved:
        assert on[u].index("NEW-1") == 9 and on[u][:9] == off[u][:9]
    for u in users:
        if u not in moved:
            assert on[u] == off[u]


def test_the_cold_item_rank_setting_reaches_the_served_reranker(tmp_path, monkeypatch):
    from serve_helpers import beauty_slice

    from dragonrec.serve import Service, Settings

    data = beauty_slice(tmp_path / "data", n_items=200, max_users=100)
    monkeypatch.setenv("DRAGONREC_COLD_ITEM_RANK", "score")
    monkeypatch.setenv("DRAGONREC_COLD_ITEM_SLOTS", "2")
    settings = Settings(data_dir=data, state_dir=tmp_path / "state", embedding_cache_dir=str(tmp_path / "emb"))
    with Service(settings) as service:
        cfg = service.serving.pipeline.reranker.cfg
        assert (cfg.cold_item_rank, cfg.cold_item_slots) == ("score", 2)
    monkeypatch.setenv("DRAGONREC_COLD_ITEM_RANK", "popularity")
    with pytest.raises(ValueError, match="cold_item_rank"):
        Settings(data_dir=data, state_dir=tmp_path / "state")
