"""Constrained decoding: only real product tokens, no repeats, exclusions honoured, beam search exact when wide."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dragonrec.model.decode import ItemConstraint, generate_items, left_pad, score_next_items

N_OTHER, N_ITEMS = 10, 30  # token ids 0..9 are specials/actions/words, 10..39 are product tokens
ITEM_TOKENS = np.arange(N_OTHER, N_OTHER + N_ITEMS)


@pytest.fixture(scope="module")
def adversarial_model():
    """A random tiny Llama whose output layer strongly prefers non-item tokens."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=N_OTHER + N_ITEMS, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        w = model.lm_head.weight
        w[:N_OTHER] = torch.randn(N_OTHER, 16) * 10.0
        w[N_OTHER:] = torch.randn(N_ITEMS, 16) * 0.3
    return model


def _prompts(seed: int = 0, batch: int = 6):
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, N_OTHER + N_ITEMS, size=int(rng.integers(1, 9))).tolist()] for _ in range(batch)]


def test_unconstrained_model_prefers_non_items(adversarial_model):
    """The precondition that makes the next test meaningful."""
    ids, mask = left_pad(_prompts(), pad_id=0)
    out = adversarial_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
    assert (out[:, ids.shape[1]:] < N_OTHER).float().mean() > 0.8


@pytest.mark.parametrize("num_beams", [1, 4])
def test_constrained_lists_are_real_distinct_and_respect_exclusions(adversarial_model, num_beams):
    rng = np.random.default_rng(1)
    prompts = _prompts(seed=2, batch=8)
    exclude = [rng.choice(N_ITEMS, size=int(rng.integers(0, 15)), replace=False).tolist() for _ in prompts]
    ids, mask = left_pad(prompts, pad_id=0)
    n = 12
    lists = generate_items(adversarial_model, ids, ITEM_TOKENS, n=n, attention_mask=mask, exclude=exclude,
                           num_beams=num_beams)
    assert len(lists) == len(prompts)
    for items, ex in zip(lists, exclude):
        assert len(items) == n and len(set(items)) == n
        assert all(0 <= k < N_ITEMS for k in items)
        assert not set(items) & set(ex)


def test_exhausting_the_catalog_still_emits_only_items(adversarial_model):
    """Asking for every item left: the last steps have a single allowed token each."""
    ids, mask = left_pad(_prompts(batch=2), pad_id=0)
    exclude = [list(range(0, N_ITEMS, 2)), []]
    with pytest.raises(ValueError, match="only 15 items are left"):
        generate_items(adversarial_model, ids, ITEM_TOKENS, n=16, attention_mask=mask, exclude=exclude)
    lists = generate_items(adversarial_model, ids[:1], ITEM_TOKENS, n=15, attention_mask=mask[:1],
                           exclude=exclude[:1])
    assert sorted(lists[0]) == list(range(1, N_ITEMS, 2))


def test_greedy_first_item_is_the_best_scored_and_padding_does_not_change_scores(adversarial_model):
    prompts = _prompts(seed=3, batch=5)
    ids, mask = left_pad(prompts, pad_id=0)
    scores = score_next_items(adversarial_model, ids, ITEM_TOKENS, attention_mask=mask)
    assert scores.shape == (5, N_ITEMS)
    for b, p in enumerate(prompts):  # each prompt alone, unpadded
        alone = score_next_items(adversarial_model, torch.tensor([p]), ITEM_TOKENS)[0]
        assert torch.allclose(scores[b], alone, atol=1e-4)
    exclude = [[int(scores[b].argmax())] for b in range(5)]  # bar each prompt's favourite
    lists = generate_items(adversarial_model, ids, ITEM_TOKENS, n=3, attention_mask=mask, exclude=exclude)
    for b in range(5):
        s = scores[b].clone()
        s[exclude[b]] = -float("inf")
        assert lists[b][0] == int(s.argmax())


def test_wide_beam_search_finds_the_best_pair(adversarial_model):
    """With num_beams >= n_items, beam search over 2 items is exhaustive: compare with brute force."""
    prompt = _prompts(seed=4, batch=1)[0]
    ids = torch.tensor([prompt])
    exclude = [3, 7]
    best = generate_items(adversarial_model, ids, ITEM_TOKENS, n=2, exclude=[exclude], num_beams=N_ITEMS)[0]

    allowed = [k for k in range(N_ITEMS) if k not in exclude]
    with torch.no_grad():
        first = torch.log_softmax(adversarial_model(ids).logits[0, -1], -1)
        second = {a: torch.log_softmax(adversarial_model(torch.tensor([[*prompt, int(ITEM_TOKENS[a])]])).logits[0, -1],
                                       -1) for a in allowed}
    brute = max(itertools.permutations(allowed, 2),
                key=lambda ab: float(first[ITEM_TOKENS[ab[0]]] + second[ab[0]][ITEM_TOKENS[ab[1]]]))
    assert tuple(best) == brute


def test_constraint_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        ItemConstraint([5, 5, 6], prompt_length=1)
    with pytest.raises(ValueError, match="outside"):
        ItemConstraint([5, 6], prompt_length=1, exclude=[[2]])
    c = ItemConstraint([5, 6, 99], prompt_length=1)
    with pytest.raises(ValueError, match="past the model's vocabulary"):
        c(torch.tensor([[1]]), torch.zeros(1, 50))
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []])


def test_core_model_generates_its_own_top_items():
    """On `SeqRecLM.merged_causal_lm()`, the constrained scores equal `score_items` and greedy follows them."""
    lm = pytest.importorskip("dragonrec.model.lm")
    from dragonrec.model.config import SeqRecConfig

    torch.manual_seed(0)
    tok = lm.ItemTokenizer.from_train(np.arange(20), n_catalog=25, seed=1)
    model = lm.SeqRecLM(SeqRecConfig(hidden_size=16, num_layers=1, max_len=12), tok.n_items).eval()
    hf = model.merged_causal_lm().eval()
    histories = [np.array([3, 5, 7]), np.array([11]), np.array([0, 19, 4, 8, 2])]
    prompts = [tok.encode(h) for h in histories]
    item_tokens = lm.ITEM_OFFSET + np.arange(tok.n_items)
    ids, mask = left_pad(prompts, pad_id=lm.PAD_ID)
    ours = score_next_items(hf, ids, item_tokens, attention_mask=mask)
    with torch.no_grad():
        theirs = model.score_items(lm.pad_batch(prompts))
    assert torch.allclose(ours, theirs, atol=1e-4)
    exclude = [tok.item_ids(h).tolist() for h in histories]
    lists = generate_items(hf, ids, item_tokens, n=4, attention_mask=mask, exclude=exclude, num_beams=2,
                           pad_token_id=lm.PAD_ID)
    for h, ex, items in zip(histories, exclude, lists):
        catalog = tok.vocab.catalog_index[items]
        assert len(set(items)) == 4 and not set(items) & set(ex) and not set(catalog.tolist()) & set(h.tolist())
