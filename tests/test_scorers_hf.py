"""The local Hugging Face scorer on a tiny GPT-2 built and saved by the test (no downloads)."""

from __future__ import annotations

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
