"""The token layout and SeqRecLM: round trips, padding-free loss, save/load, the merged HF model, item text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dragonrec.model import (
    ACTION_OFFSET,
    BOS_ID,
    ITEM_OFFSET,
    PAD_ID,
    RECOMMEND_ID,
    ItemTokenizer,
    SeqRecConfig,
    SeqRecLM,
)
from dragonrec.model.lm import IGNORE, pad_batch
from dragonrec.schema import ACTIONS


def tiny_cfg(**kw) -> SeqRecConfig:
    return SeqRecConfig(**{"hidden_size": 16, "num_layers": 1, "num_heads": 1, "max_len": 12, **kw})


def test_layout_constants():
    tok = ItemTokenizer.from_train(np.array([4, 2, 7]), n_catalog=9)
    tokens = tok.tokens()
    assert tokens[:4] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert tokens[RECOMMEND_ID] == "[RECOMMEND]"
    assert tokens[ACTION_OFFSET:ITEM_OFFSET] == [f"<{a.value}>" for a in ACTIONS]
    assert tokens[ITEM_OFFSET:] == ["<item_0>", "<item_1>", "<item_2>"]
    assert tok.vocab_size == len(tokens) == ITEM_OFFSET + 3


def test_item_ids_come_from_training_items_only_in_random_order():
    train = np.arange(200)[::-1]
    tok = ItemTokenizer.from_train(train, n_catalog=300, seed=3)
    assert set(tok.vocab.catalog_index.tolist()) == set(range(200))
    assert not np.array_equal(tok.vocab.catalog_index, np.arange(200))  # not in catalog or sequence order
    assert (tok.item_ids(np.array([250, 299])) == -1).all()


def test_encode_decode_round_trip_both_modes():
    tok = ItemTokenizer.from_train(np.array([5, 3, 9, 1]), n_catalog=12)
    hist = np.array([9, 1, 5])
    ids = tok.encode(hist)
    assert ids[0] == BOS_ID and all(i >= ITEM_OFFSET for i in ids[1:])
    items, acts = tok.decode(ids)
    np.testing.assert_array_equal(items, hist)
    assert acts == [None, None, None]

    narr = tok.encode(hist, ["view", "add_to_cart", "purchase"], narrative=True)
    assert narr[1] == ACTION_OFFSET + ACTIONS.index("view") and len(narr) == 7
    items, acts = tok.decode(narr)
    np.testing.assert_array_equal(items, hist)
    assert acts == ["view", "add_to_cart", "purchase"]


def test_encode_drops_unknown_items_and_cuts_old_history():
    tok = ItemTokenizer.from_train(np.arange(10), n_catalog=20)
    ids = tok.encode(np.array([15, 1, 2, 16, 3]))  # 15, 16 never seen in training
    np.testing.assert_array_equal(tok.decode(ids)[0], [1, 2, 3])
    ids = tok.encode(np.arange(10), max_len=4)
    assert len(ids) == 4 and ids[0] == BOS_ID
    np.testing.assert_array_equal(tok.decode(ids)[0], [7, 8, 9])
    narr = tok.encode(np.arange(10), ["view"] * 10, narrative=True, max_len=7)
    np.testing.assert_array_equal(tok.decode(narr)[0], [7, 8, 9])


def test_bad_input_is_rejected():
    tok = ItemTokenizer.from_train(np.arange(5), n_catalog=5)
    with pytest.raises(ValueError, match="out of range"):
        tok.encode(np.array([7]))
    with pytest.raises(ValueError, match="needs the actions"):
        tok.encode(np.array([1]), narrative=True)
    with pytest.raises(ValueError, match="unknown action"):
        tok.encode(np.array([1]), ["teleport"], narrative=True)
    with pytest.raises(ValueError, match="past the vocabulary"):
        tok.decode([ITEM_OFFSET + 99])


def test_target_labels_point_at_the_next_item():
    tok = ItemTokenizer.from_train(np.arange(5), n_catalog=5)
    ids = tok.encode(np.array([0, 1, 2]))
    labels = tok.target_labels(ids)
    assert labels == [ids[1] - ITEM_OFFSET, ids[2] - ITEM_OFFSET, ids[3] - ITEM_OFFSET, IGNORE]
    narr = tok.encode(np.array([0, 1]), ["view", "purchase"], narrative=True)
    labels = tok.target_labels(narr, narrative=True)  # the first item token predicts the second item
    assert labels == [IGNORE, IGNORE, narr[4] - ITEM_OFFSET, IGNORE, IGNORE]


def test_hf_tokenizer_agrees_and_round_trips_on_disk(tmp_path):
    tok = ItemTokenizer.from_train(np.array([3, 1, 2]), n_catalog=6, with_all_items=True)
    ids = tok.encode(np.array([1, 2, 5]), ["view", "click", "purchase"], narrative=True)
    hf = tok.to_hf()
    text = " ".join(hf.convert_ids_to_tokens(ids)) + " [RECOMMEND]"
    assert hf(text, add_special_tokens=False)["input_ids"] == [*ids, RECOMMEND_ID]
    assert hf.pad_token_id == PAD_ID and hf.bos_token_id == BOS_ID
    tok.save(tmp_path)
    back = ItemTokenizer.load(tmp_path)
    assert back.n_trained == tok.n_trained == 3 and back.n_items == 6
    np.testing.assert_array_equal(back.vocab.catalog_index, tok.vocab.catalog_index)
    from transformers import PreTrainedTokenizerFast
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path)).convert_tokens_to_ids("<item_4>") == ITEM_OFFSET + 4


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = SeqRecLM(tiny_cfg(), n_items=10).eval()  # eval: dropout off, so the two passes are comparable
    tok = ItemTokenizer.from_train(np.arange(10), n_catalog=10)
    seqs = [tok.encode(np.array([1, 2, 3])), tok.encode(np.array([4, 5]))]
    labels = [tok.target_labels(s) for s in seqs]
    loss = model(pad_batch(seqs), pad_batch(labels, IGNORE))
    longer = [s + [PAD_ID] * 5 for s in seqs]
    longer_labels = [lab + [IGNORE] * 5 for lab in labels]
    loss_padded = model(pad_batch(longer), pad_batch(longer_labels, IGNORE))
    torch.testing.assert_close(loss, loss_padded)
    # and scores at the last real token do not depend on trailing pads either
    torch.testing.assert_close(model.score_items(pad_batch(seqs)), model.score_items(pad_batch(longer)))


@pytest.mark.parametrize("use_text", [False, True])
def test_save_load_and_merged_hf_model_give_identical_scores(tmp_path, use_text):
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(6), n_catalog=8, with_all_items=use_text)
    text = np.random.default_rng(0).normal(size=(tok.n_items, 384)).astype(np.float32) if use_text else None
    model = SeqRecLM(tiny_cfg(use_text=use_text, arch="qwen2" if use_text else "llama"), tok.n_items,
                     tok.n_trained, text_emb=text).eval()
    ids = pad_batch([tok.encode(np.array([1, 2, 3])), tok.encode(np.array([4]))])
    scores = model.score_items(ids)
    model.save_pretrained(tmp_path, tok)
    back = SeqRecLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(back.score_items(ids), scores, rtol=0, atol=0)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # plain HF load: logits = our scores
    logits = hf(input_ids=ids[:1, :4]).logits[0, -1, ITEM_OFFSET:]
    torch.testing.assert_close(logits, scores[0], rtol=1e-5, atol=1e-5)


def test_text_mode_scores_items_never_seen_in_training():
    tok = ItemTokenizer.from_train(np.arange(4), n_catalog=6, with_all_items=True)
    assert tok.n_trained == 4 and tok.n_items == 6
    text = np.eye(6, 384, dtype=np.float32)
    model = SeqRecLM(tiny_cfg(use_text=True), tok.n_items, tok.n_trained, text_emb=text).eval()
    cold = tok.item_ids(np.array([4, 5]))
    assert (cold >= 4).all()
    own = model.embeddings.weight[ITEM_OFFSET + 4:]
    assert torch.count_nonzero(own) == 0  # no learned vector of their own
    scores = model.score_items(pad_batch([tok.encode(np.array([0, 1]))]))
    assert scores.shape == (1, 6) and torch.isfinite(scores).all()
    assert scores[0, cold[0]] != scores[0, cold[1]]  # their text tells them apart
    with pytest.raises(ValueError, match="needs text_emb"):
        SeqRecLM(tiny_cfg(use_text=True), 6, 4)


def test_id_dropout_only_acts_in_training_text_mode():
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(6), n_catalog=6)
    text = np.random.default_rng(0).normal(size=(6, 384)).astype(np.float32)
    model = SeqRecLM(tiny_cfg(use_text=True, id_dropout=0.5, emb_dropout=0.0, hidden_dropout=0.0), 6, text_emb=text)
    ids = pad_batch([tok.encode(np.array([1, 2, 3]))])
    labels = pad_batch([tok.target_labels(ids[0].tolist())], IGNORE)
    model.train()
    assert len({float(model(ids, labels).detach()) for _ in range(6)}) > 1  # a different item subset each step
    model.eval()
    assert len({float(model(ids, labels).detach()) for _ in range(3)}) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_inference_forward_computes_what_the_hf_backbone_does(arch):
    """Scoring runs the backbone's layers without HF's generic wrapper (`_decoder_inference`): the same numbers."""
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(9), n_catalog=9)
    model = SeqRecLM(tiny_cfg(arch=arch, num_layers=2, num_heads=2, narrative=True), tok.n_items).eval()
    acts = np.array(["view", "add_to_cart", "purchase", "view"], dtype=object)
    ids = pad_batch([tok.encode(np.array([1, 2, 3, 4]), acts), tok.encode(np.array([5]), acts[:1]),
                     tok.encode(np.array([6, 7]), acts[:2])])
    with torch.no_grad():
        fast = model.hidden_states(ids)
        emb = model.embeddings(ids)
        slow = model.lm.model(inputs_embeds=emb).last_hidden_state
        one = model.hidden_states(ids[1:2, :1])  # a single token: no causal mask needed
    assert model._plain_causal_layers()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    torch.testing.assert_close(one, model.lm.model(inputs_embeds=model.embeddings(ids[1:2, :1])).last_hidden_state,
                               rtol=0, atol=1e-6)


def test_the_cold_heads_text_query_at_the_last_token_is_the_full_querys_row():
    """Scoring reads the cold head's text query only at each row's last real token (`text_query(at=...)`): the
    same vectors as the query of every position, read there; gradients reach the learned decay either way."""
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(8), n_catalog=8, with_all_items=True)
    text = np.random.default_rng(0).normal(size=(tok.n_items, 384)).astype(np.float32)
    model = SeqRecLM(tiny_cfg(use_text=True, cold_head=True), tok.n_items, tok.n_trained, text_emb=text)
    ids = pad_batch([tok.encode(np.array([1, 2, 3, 4, 5])), tok.encode(np.array([6])), tok.encode(np.array([0, 7]))])
    last = (ids != 0).sum(dim=1) - 1
    full = model.text_query(ids)[torch.arange(3), last]
    at = model.text_query(ids, at=last)
    torch.testing.assert_close(at, full, rtol=0, atol=1e-6)
    at.sum().backward()
    assert model.cold_decay.grad is not None and model.cold_decay.grad.abs().sum() > 0


def test_the_inference_forward_follows_weight_changes_and_steps_aside_for_wrapped_layers():
    """The fused weights of `_decoder_inference` are rebuilt when a parameter changes (an optimizer step, a
    `load_state_dict`); a projection that is not a plain Linear (an adapter) sends scoring through the backbone."""
    torch.manual_seed(0)
    tok = ItemTokenizer.from_train(np.arange(9), n_catalog=9)
    model = SeqRecLM(tiny_cfg(num_layers=2), tok.n_items).eval()
    ids = pad_batch([tok.encode(np.array([1, 2, 3])), tok.encode(np.array([4]))])

    def backbone():
        return model.lm.model(inputs_embeds=model.embeddings(ids)).last_hidden_state

    with torch.no_grad():
        before = model.hidden_states(ids)
        torch.testing.assert_close(before, backbone(), rtol=0, atol=1e-6)
        model.lm.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # in place: the tensor's version moves
        after = model.hidden_states(ids)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, backbone(), rtol=0, atol=1e-6)
        model.load_state_dict({k: v * 0.5 if "q_proj" in k else v for k, v in model.state_dict().items()})
        torch.testing.assert_close(model.hidden_states(ids), backbone(), rtol=0, atol=1e-6)

    class Scaled(nn.Module):  # a stand-in for an adapter around a projection
        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.inner, self.weight, self.bias = inner, inner.weight, inner.bias

        def forward(self, x):
            return 2.0 * self.inner(x)

    model.lm.model.layers[0].self_attn.v_proj = Scaled(model.lm.model.layers[0].self_attn.v_proj)
    assert not model._plain_causal_layers()
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(ids), backbone(), rtol=0, atol=1e-6)
