"""The token layout over products and actions, and the causal LM that predicts the next product token.

Token layout (one vocabulary, fixed; `ItemTokenizer` owns it):

    id 0..3     [PAD]=0 [BOS]=1 [EOS]=2 [UNK]=3                 (SPECIAL_TOKENS)
    id 4..5     [USER]=4 [RECOMMEND]=5                          (MARKER_TOKENS, for narrative prompts)
    id 6..14    <view> <hover> <click> <scroll_past> <add_to_cart> <remove_from_cart> <purchase> <review>
                <favorite>                                      (ACTION_TOKENS, in `dragonrec.schema.ACTIONS` order)
    id 15+k     <item_k>, k = model id of `ItemVocab`            (ITEM_OFFSET = 15)

Model ids k < `n_trained` are items seen in training, numbered in a seeded random order (never sequence or
ASIN order). With item text (`with_all_items=True`) the remaining catalog items follow as k >= n_trained:
they have a token, no learned vector of their own (it stays zero) and a score from their text alone.

Sequences (`ItemTokenizer.encode`), right-padded with [PAD] in batches:
    SASRec mode     [BOS] <item_a> <item_b> ... <item_n>
    narrative mode  [BOS] <view> <item_a> <purchase> <item_b> ... <review> <item_n>
The hidden state at an item token (and at [BOS] in SASRec mode) predicts the NEXT product: training targets
sit on those positions and the next-item scores of a history are read at its last token. [RECOMMEND] and
[USER] are reserved for text prompts built on top (they carry no trained meaning in `SeqRecLM`).

`SeqRecLM` wraps a `transformers` `LlamaForCausalLM` (or `Qwen2ForCausalLM`) with tied input/output
embeddings; `merged_causal_lm()` returns a plain HF model whose logits over item tokens equal `score_items`,
for `generate(prefix_allowed_tokens_fn=...)`; `save_pretrained(dir)` writes that HF model (config.json +
model.safetensors) and the tokenizer (tokenizer.json, item_tokens.json) so `AutoModelForCausalLM` and
`PreTrainedTokenizerFast` load it, plus `seqrec.json` / `seqrec.safetensors` to restore this wrapper exactly.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dragonrec.data.vocab import ItemVocab
from dragonrec.model.config import SeqRecConfig
from dragonrec.schema import ACTIONS, parse_action, positive_mask

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MARKER_TOKENS = ("[USER]", "[RECOMMEND]")
USER_ID, RECOMMEND_ID = 4, 5
ACTION_OFFSET = len(SPECIAL_TOKENS) + len(MARKER_TOKENS)
ACTION_TOKENS = tuple(f"<{a.value}>" for a in ACTIONS)
ITEM_OFFSET = ACTION_OFFSET + len(ACTION_TOKENS)
IGNORE = -100  # label of positions without a next-item target


class ItemTokenizer:
    """Encodes histories (catalog indices + action names) into token ids of the layout above, and back."""

    def __init__(self, vocab: ItemVocab, n_trained: int | None = None):
        self.vocab = vocab
        self.n_trained = len(vocab) if n_trained is None else int(n_trained)
        if not 0 < self.n_trained <= len(vocab):
            raise ValueError(f"n_trained={self.n_trained} must be in 1..{len(vocab)}")

    @classmethod
    def from_train(cls, train_item_idx: np.ndarray, n_catalog: int, seed: int = 0,
                   with_all_items: bool = False) -> ItemTokenizer:
        """Tokens for training items (random order); `with_all_items` appends every other catalog item."""
        base = ItemVocab.from_train(train_item_idx, n_catalog, seed)
        if not with_all_items:
            return cls(base)
        rest = np.flatnonzero(base.model_id < 0)
        rest = rest[np.random.default_rng(seed + 1).permutation(len(rest))]
        return cls(ItemVocab(np.concatenate([base.catalog_index, rest]), n_catalog), n_trained=len(base))

    @property
    def n_items(self) -> int:
        """Product tokens (trained and text-only)."""
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return ITEM_OFFSET + self.n_items

    def tokens(self) -> list[str]:
        """Every token string, position = token id."""
        return [*SPECIAL_TOKENS, *MARKER_TOKENS, *ACTION_TOKENS, *(f"<item_{k}>" for k in range(self.n_items))]

    def item_ids(self, catalog_idx: np.ndarray) -> np.ndarray:
        """Model ids of catalog items (-1 where the model has no token)."""
        catalog_idx = np.asarray(catalog_idx, dtype=np.int64)
        if len(catalog_idx) and (catalog_idx.min() < 0 or catalog_idx.max() >= self.vocab.n_catalog):
            raise ValueError(f"catalog index out of range 0..{self.vocab.n_catalog - 1}")
        return self.vocab.encode(catalog_idx)

    @staticmethod
    def action_token(action) -> int:
        return ACTION_OFFSET + parse_action(str(action)).code

    def encode(self, history: np.ndarray, actions: Sequence | None = None, narrative: bool = False,
               max_len: int | None = None) -> list[int]:
        """Token ids of one history, [BOS] first; items without a token are dropped; the oldest events are
        cut so that at most `max_len` tokens remain. Without narrative (no action tokens to say otherwise),
        only positive events are written when the actions are known: a scroll-past is not a step of interest."""
        ids = self.item_ids(history)
        keep = ids >= 0
        if not narrative and actions is not None:
            keep &= positive_mask(np.asarray(actions, dtype=object))
        items = ids[keep] + ITEM_OFFSET
        if not narrative:
            if max_len is not None:
                items = items[len(items) - min(len(items), max_len - 1):]
            return [BOS_ID, *items.tolist()]
        if actions is None:
            raise ValueError("narrative mode needs the actions aligned with the history")
        acts = np.asarray(actions, dtype=object)
        if len(acts) != len(ids):
            raise ValueError(f"{len(acts)} actions for {len(ids)} history items")
        acts = [self.action_token(a) for a in acts[keep]]
        if max_len is not None:
            n = min(len(items), (max_len - 1) // 2)
            items, acts = items[len(items) - n:], acts[len(acts) - n:]
        out = [BOS_ID]
        for a, i in zip(acts, items.tolist()):
            out += [a, i]
        return out

    def decode(self, token_ids: Sequence[int]) -> tuple[np.ndarray, list[str | None]]:
        """Catalog indices of the item tokens in order, and the action each one follows (None if none)."""
        items, acts, last_action = [], [], None
        for t in token_ids:
            t = int(t)
            if t >= ITEM_OFFSET:
                if t - ITEM_OFFSET >= self.n_items:
                    raise ValueError(f"token id {t} is past the vocabulary ({self.vocab_size})")
                items.append(int(self.vocab.catalog_index[t - ITEM_OFFSET]))
                acts.append(last_action)
                last_action = None
            elif t >= ACTION_OFFSET:
                last_action = ACTIONS[t - ACTION_OFFSET].value
        return np.asarray(items, dtype=np.int64), acts

    def target_labels(self, token_ids: Sequence[int], narrative: bool = False,
                      positive: Sequence[bool] | None = None) -> list[int]:
        """Per position, the model id of the next product (IGNORE where none): position of [BOS] (SASRec
        mode) or of an item token predicts the following item token. `positive[k]` (aligned with the item
        tokens) False makes item k no target: negative and neutral events are context, never positives."""
        ids = list(token_ids)
        item_pos = [p for p, t in enumerate(ids) if t >= ITEM_OFFSET]
        labels = [IGNORE] * len(ids)
        sources = item_pos[:-1] if narrative else [0, *item_pos[:-1]]
        dests = range(1, len(item_pos)) if narrative else range(len(item_pos))
        for src, k in zip(sources, dests):
            if positive is None or positive[k]:
                labels[src] = ids[item_pos[k]] - ITEM_OFFSET
        return labels

    def to_hf(self):
        """A `transformers.PreTrainedTokenizerFast` over the same ids (WordLevel, whitespace-split)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(self.tokens())}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                       eos_token="[EOS]", unk_token="[UNK]",
                                       additional_special_tokens=list(MARKER_TOKENS))

    def save(self, path: Path | str) -> None:
        """item_tokens.json (the id mapping) and the HF tokenizer files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "item_tokens.json").write_text(json.dumps({**self.vocab.to_dict(), "n_trained": self.n_trained}))
        self.to_hf().save_pretrained(str(path))

    @classmethod
    def load(cls, path: Path | str) -> ItemTokenizer:
        f = Path(path) / "item_tokens.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: not a saved ItemTokenizer")
        d = json.loads(f.read_text())
        return cls(ItemVocab.from_dict(d), n_trained=d["n_trained"])


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for inference. On the CPU through numpy's BLAS: torch's MKL runs this shape (a few rows
    against a tall matrix that does not fit in cache) at a third of the memory bandwidth on AMD processors
    (docs/load.md: 2.0 ms against 0.76 ms for [1 x 384] x [384 x 12,101]); float32 either way."""
    if a.device.type != "cpu" or a.dtype != torch.float32 or b.dtype != torch.float32:
        return a @ b.T
    return torch.from_numpy(a.contiguous().numpy() @ b.numpy().T)


def pad_batch(seqs: Sequence[Sequence[int]], value: int = PAD_ID) -> torch.Tensor:
    """Right-pad token (or label) lists into one LongTensor [B, L]."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _backbone_config(cfg: SeqRecConfig, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    kw = {"vocab_size": vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,
          "intermediate_size": cfg.intermediate_size or cfg.hidden_size,
          "max_position_embeddings": cfg.max_len + 8, "attention_dropout": cfg.attention_dropout,
          "initializer_range": cfg.init_std, "tie_word_embeddings": True, "pad_token_id": PAD_ID,
          "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "use_cache": False,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    return LlamaConfig(**kw) if cfg.arch == "llama" else Qwen2Config(**kw)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm`/`Qwen2RMSNorm` for float32 inputs, without the module call."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else m.weight.new_zeros(m.out_features) for m, b in zip(linears, biases)])


@dataclass(frozen=True)
class _LayerWeights:
    """One decoder layer's weights as `SeqRecLM._decoder_inference` reads them."""

    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    head_dim: int
    scaling: float
    o: torch.Tensor
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: nn.Module) -> _LayerWeights:
        a, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            return cls(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                       torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                       _cat_bias(a.q_proj, a.k_proj, a.v_proj), a.head_dim, a.scaling, a.o_proj.weight, a.o_proj.bias,
                       layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                       torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), _cat_bias(mlp.gate_proj, mlp.up_proj),
                       mlp.down_proj.weight, mlp.down_proj.bias, mlp.act_fn)


class SeqRecLM(nn.Module):
    """A small HF causal LM over the token layout, scored over product tokens only.

    item vector(k) = own row k of the tied embedding (+ text_proj(text_emb[k]) when cfg.use_text);
    score(history, k) = <final hidden state at the history's last token, item vector(k)>.
    With cfg.cold_head and a calibrated offset, scores are log-probabilities instead: the main path's
    log-softmax over trained items, and for items without a trained vector the text-only cold head's
    log-probability plus the offset (`score_items`). `generate` (the merged HF model) uses the main path only.
    """

    def __init__(self, cfg: SeqRecConfig, n_items: int, n_trained: int | None = None,
                 text_emb: np.ndarray | torch.Tensor | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.cfg, self.n_items = cfg, int(n_items)
        self.n_trained = self.n_items if n_trained is None else int(n_trained)
        self.lm = AutoModelForCausalLM.from_config(_backbone_config(cfg, ITEM_OFFSET + self.n_items),
                                                   attn_implementation="sdpa")
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        self._hooks = [m.register_forward_hook(self._dropout_hook) for layer in self.lm.model.layers
                       for m in (layer.self_attn, layer.mlp)] if cfg.hidden_dropout > 0 else []
        self.text_proj: nn.Linear | None = None
        if cfg.use_text:
            if text_emb is None:
                raise ValueError("use_text=True needs text_emb [n_items, text_dim]")
            text_emb = torch.as_tensor(np.asarray(text_emb, dtype=np.float32))
            if tuple(text_emb.shape) != (self.n_items, cfg.text_dim):
                raise ValueError(f"text_emb has shape {tuple(text_emb.shape)}, expected {(self.n_items, cfg.text_dim)}")
            self.register_buffer("text_emb", text_emb)
            self.text_proj = nn.Linear(cfg.text_dim, cfg.hidden_size, bias=False)
            nn.init.normal_(self.text_proj.weight, std=cfg.init_std)
            with torch.no_grad():  # text-only items never train a vector of their own: start (and stay) at zero
                self.embeddings.weight[ITEM_OFFSET + self.n_trained:] = 0.0
        self.cold_proj: nn.Linear | None = None
        if cfg.cold_head:
            if self.text_proj is None:
                raise ValueError("cold_head=True needs use_text=True (the cold head scores items by their text)")
            # cold head: logit(item) = <h, cold_proj(text)> + scale * <q, text>, q the recency-weighted mean text
            # of the history (what dense retrieval matches on), h the detached hidden state
            self.cold_proj = nn.Linear(cfg.text_dim, cfg.hidden_size, bias=False)
            nn.init.normal_(self.cold_proj.weight, std=cfg.init_std)
            self.cold_scale = nn.Parameter(torch.tensor(10.0))  # temperature of the text match (cosine in -1..1)
            self.cold_decay = nn.Parameter(torch.tensor(1.386))  # logit of the per-step recency decay (0.8)
            # log-prior of a cold item against the trained ones (set by calibration on validation); -inf until then:
            # cold items are then scored by the main path, as without the head
            self.register_buffer("cold_offset", torch.tensor(float("-inf")))

    def _dropout_hook(self, module, args, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], self.cfg.hidden_dropout, self.training), *output[1:])
        return F.dropout(output, self.cfg.hidden_dropout, self.training)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def item_vectors(self, trained_only: bool = False, own_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[n_items (or n_trained), H] output vectors of the product tokens, model-id order.

        own_mask: [n_items] 0/1, which items keep their own vector (ID dropout in training; None = all).
        """
        n = self.n_trained if trained_only else self.n_items
        w = self.embeddings.weight[ITEM_OFFSET:ITEM_OFFSET + n]
        if self.text_proj is None:
            return w
        if own_mask is not None:
            w = w * own_mask[:n, None]
        if torch.is_grad_enabled() or own_mask is not None:
            return w + self.text_proj(self.text_emb[:n])
        # inference: the projection of every item's text is the costly part of a single request; reuse it
        # until a weight changes (in-place updates and load_state_dict bump the tensors' versions)
        key = (n, self.embeddings.weight._version, self.text_proj.weight._version, self.embeddings.weight.data_ptr())
        if getattr(self, "_item_cache", (None,))[0] != key:
            self._item_cache = (key, w + self.text_proj(self.text_emb[:n]))
        return self._item_cache[1]

    @property
    def n_head(self) -> int:
        """Trained items the cold head trains on: model ids below it (the last `cold_holdout` share of the trained
        ids, a random set since ids are numbered in a seeded random order, is kept out for calibration)."""
        return self.n_trained - round(self.cfg.cold_holdout * self.n_trained) if self.cold_proj is not None else 0

    @property
    def cold_ready(self) -> bool:
        """Whether cold items are scored by the calibrated cold head."""
        return self.cold_proj is not None and bool(torch.isfinite(self.cold_offset))

    def cold_vectors(self, text_emb: torch.Tensor | None = None) -> torch.Tensor:
        """[n, H + text_dim] the cold head's item vectors [cold_proj(text), text] (`text_emb`: other items' text,
        e.g. products added after training; None = every item of the model)."""
        if text_emb is not None:
            return torch.cat([self.cold_proj(text_emb), text_emb], dim=1)
        if torch.is_grad_enabled():
            return torch.cat([self.cold_proj(self.text_emb), self.text_emb], dim=1)
        key = (self.cold_proj.weight._version, self.cold_proj.weight.data_ptr())
        if getattr(self, "_cold_cache", (None,))[0] != key:
            self._cold_cache = (key, torch.cat([self.cold_proj(self.text_emb), self.text_emb], dim=1))
        return self._cold_cache[1]

    def text_query(self, input_ids: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, text_dim] at each position, the unit-normalised recency-weighted sum of the item texts read so
        far (decay per token learned): the content query of the cold head. With `at` [B] (a position per row),
        only there: [B, text_dim], what scoring reads, without the [B, L, text_dim] of every position."""
        k = input_ids - ITEM_OFFSET
        x = self.text_emb[k.clamp(min=0)] * (k >= 0).unsqueeze(-1)
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        lag = (t[:, None] - t[None, :]).float() if at is None else (at[:, None] - t[None, :]).float()
        weights = torch.where(lag >= 0, torch.sigmoid(self.cold_decay) ** lag.clamp(min=0), 0.0)  # causal
        if at is not None:  # [B, L] weights of each row's position
            return F.normalize(torch.einsum("bs,bsd->bd", weights, x), dim=-1)
        return F.normalize(torch.einsum("ts,bsd->btd", weights, x), dim=-1)

    def cold_query(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """[N, H + text_dim] the head's query from hidden states [N, H] (detached: the head never changes the main
        path) and text queries [N, text_dim]."""
        return torch.cat([h.detach(), self.cold_scale * q], dim=1)

    def cold_loss(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the cold head over the items it trains on. z: [N, H + text_dim] head queries;
        targets: [N] model ids (held-out and untrained targets are skipped)."""
        n = self.n_head
        keep = targets < n
        logits = z[keep] @ self.cold_vectors()[:n].T  # [N', n_head]
        return F.cross_entropy(logits, targets[keep]) if keep.any() else logits.sum() * 0.0

    def log_probs(self, last: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts a calibrated score is made of, for last hidden states [B, H] and the head's queries
        [B, H + text_dim]: the main path's logits [B, n_items] and the cold head's log-probabilities [B, n_items],
        its logits normalised over the items it trains on (model ids < n_head), so any other item's value reads as
        its log-probability had it been one more candidate of that softmax."""
        main = last @ self.item_vectors().T
        if torch.is_grad_enabled():
            text = query @ self.cold_vectors().T
        else:
            # The same logits with one matrix read instead of two: cold_proj is linear without a bias, so
            # <[h, s*q], [W t, t]> = <h W + s*q, t>. Scoring reads the item texts once ([n, text_dim], not
            # [n, H + text_dim]): the request path's largest memory read.
            H = last.shape[1]
            z = query[:, :H] @ self.cold_proj.weight + query[:, H:]
            text = _matmul_t(z, self.text_emb)
        return main, text - torch.logsumexp(text[:, :self.n_head], dim=1, keepdim=True)

    def hidden_states(self, input_ids: torch.Tensor, own_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, H] final (normed) hidden states of right-padded token ids [B, L].

        No attention mask is needed: with right padding and causal attention no real token sees a pad.
        """
        emb = self.embeddings(input_ids)
        if self.text_proj is not None:
            k = input_ids - ITEM_OFFSET
            is_item = (k >= 0).unsqueeze(-1)
            if own_mask is not None:  # dropped items enter by their text alone
                emb = emb * torch.where(is_item, own_mask[k.clamp(min=0)].unsqueeze(-1), 1.0)
            emb = emb + self.text_proj(self.text_emb[k.clamp(min=0)]) * is_item
        if not self.training and not torch.is_grad_enabled() and self._plain_causal_layers():
            return self._decoder_inference(emb)
        return self.lm.model(inputs_embeds=self.emb_drop(emb)).last_hidden_state

    def _plain_causal_layers(self) -> bool:
        """Whether `_decoder_inference` computes what the HF backbone does: every layer full causal attention
        (no sliding window) with as many key/value heads as query heads, and plain linear projections (an adapter
        such as LoRA wrapping one would be skipped by reading its weights)."""
        c = self.lm.config
        if c.num_key_value_heads != c.num_attention_heads or any(
                t != "full_attention" for t in getattr(c, "layer_types", None) or ["full_attention"]):
            return False
        # read through `_modules` (this runs on every scoring call; nn.Module attribute access is slow)
        for layer in self.lm.model.layers._modules.values():
            attn, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
            if any(type(attn[k]) is not nn.Linear for k in ("q_proj", "k_proj", "v_proj", "o_proj")) or any(
                    type(mlp[k]) is not nn.Linear for k in ("gate_proj", "up_proj", "down_proj")):
                return False
        return True

    def _decoder_inference(self, emb: torch.Tensor) -> torch.Tensor:
        """The backbone's forward for scoring, without its generic machinery (mask building, cache, output
        capture, argument checks) or module calls: the same operations in the same order as `LlamaModel`/
        `Qwen2Model` with no mask and no cache, on the layers' own weights, with the query, key and value
        projections (and the MLP's gate and up projections) as one matrix product each: at this size a request's
        forward is mostly per-call overhead. `tests/test_model.py` compares it with the backbone."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        backbone = self.lm.model
        B, L, _ = emb.shape
        cos, sin = backbone.rotary_emb(emb, position_ids=torch.arange(L, device=emb.device).unsqueeze(0))
        x = emb
        for w in self._inference_weights():
            qkv = F.linear(_rms_norm(x, w.norm1, w.eps1), w.qkv, w.qkv_bias)
            q, k, v = qkv.view(B, L, 3, -1, w.head_dim).permute(2, 0, 3, 1, 4)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=w.scaling, is_causal=L > 1)
            x = x + F.linear(o.transpose(1, 2).reshape(B, L, -1), w.o, w.o_bias)
            gate, up = F.linear(_rms_norm(x, w.norm2, w.eps2), w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(w.act(gate) * up, w.down, w.down_bias)
        return _rms_norm(x, backbone.norm.weight, backbone.norm.variance_epsilon)

    def _inference_weights(self) -> list[_LayerWeights]:
        """Each decoder layer's weights for `_decoder_inference`, the fused ones concatenated once and kept until a
        parameter changes (an optimizer step or `load_state_dict` bumps its version; `.to()` moves its storage)."""
        layers = self.lm.model.layers
        if getattr(self, "_layer_params", (None,))[0] is not layers:  # walking the modules costs more than the forward
            self._layer_params = (layers, list(layers.parameters()))
        key = tuple((p._version, p.data_ptr()) for p in self._layer_params[1])
        if getattr(self, "_layer_cache", (None,))[0] != key:
            self._layer_cache = (key, [_LayerWeights.of(layer) for layer in layers])
        return self._layer_cache[1]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean full-softmax cross-entropy over trained product tokens, only at positions with a target.

        input_ids, labels: [B, L]; labels hold the next item's model id or IGNORE (pads, last tokens).
        Items without a trained vector (model id >= n_trained) are skipped as targets.
        """
        mask = (labels >= 0) & (labels < self.n_trained)  # text-only items are never training targets
        own = None
        if self.training and self.text_proj is not None and self.cfg.id_dropout > 0:
            own = (torch.rand(self.n_items, device=input_ids.device) >= self.cfg.id_dropout).float()
        h = self.hidden_states(input_ids, own)[mask]  # [N, H]: gather first, so pads cost no logits
        logits = h @ self.item_vectors(trained_only=True, own_mask=own).T  # [N, n_trained]
        loss = F.cross_entropy(logits, labels[mask], label_smoothing=label_smoothing)
        if self.cold_proj is not None:
            pick = torch.randperm(len(h), device=h.device)[:self.cfg.cold_positions] if self.training else slice(None)
            q = self.text_query(input_ids)[mask]
            loss = loss + self.cold_loss(self.cold_query(h[pick], q[pick]), labels[mask][pick])
        return loss

    def last_hidden(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                    with_query: bool = False):
        """[B, H] final hidden state at each sequence's last real token (and the cold head's query there)."""
        if lengths is None:
            lengths = (input_ids != PAD_ID).sum(dim=1)
        h = self.hidden_states(input_ids)
        rows, last = torch.arange(len(h), device=h.device), lengths.to(h.device) - 1
        if not with_query:
            return h[rows, last]
        return h[rows, last], self.cold_query(h[rows, last], self.text_query(input_ids, at=last))

    def score_items(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                    extra_text: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n_items] next-item scores read at each sequence's last real token (+ [B, m] columns for the
        `extra_text` [m, text_dim] of items the model has no token for, scored by the cold head; -inf without one).

        Without a calibrated cold head: logits of the main path. With one, log-probabilities: trained items by the
        main path's log-softmax over them; cold items (model ids >= n_trained, and the extra ones) by the cold
        head's log-probability plus the calibrated offset, log P(cold item) ~ log P_text(item) + offset."""
        if not self.cold_ready:
            scores = self.last_hidden(input_ids, lengths) @ self.item_vectors().T
            if extra_text is None:
                return scores
            return torch.cat([scores, scores.new_full((len(scores), len(extra_text)), -torch.inf)], dim=1)
        n = self.n_trained
        last, query = self.last_hidden(input_ids, lengths, with_query=True)
        main, text_lp = self.log_probs(last, query)
        parts = [main[:, :n] - torch.logsumexp(main[:, :n], dim=1, keepdim=True), text_lp[:, n:] + self.cold_offset]
        if extra_text is not None:
            # the head's log-partition is what separates its logit from its log-probability (any item's)
            lse = (query @ self.cold_vectors()[0] - text_lp[:, 0])[:, None]
            text = query @ self.cold_vectors(extra_text.to(query.dtype)).T
            parts.append(text - lse + self.cold_offset)
        return torch.cat(parts, dim=1)

    def merged_causal_lm(self):
        """A copy of the HF model whose embedding rows already include the text projection (for generate)."""
        lm = copy.deepcopy(self.lm)
        if self.text_proj is not None:
            with torch.no_grad():
                lm.get_input_embeddings().weight[ITEM_OFFSET:] = self.item_vectors()
        lm.tie_weights()
        return lm

    def save_pretrained(self, path: Path | str, tokenizer: ItemTokenizer | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.merged_causal_lm().save_pretrained(str(path))
        meta = {"config": self.cfg.model_dump(), "n_items": self.n_items, "n_trained": self.n_trained}
        (path / "seqrec.json").write_text(json.dumps(meta, indent=2))
        if self.text_proj is not None:  # the merged HF weights hide the own/text split: keep it
            extra = {"own_embeddings": self.embeddings.weight.detach().contiguous(),
                     "text_proj": self.text_proj.weight.detach().contiguous(), "text_emb": self.text_emb.contiguous()}
            if self.cold_proj is not None:
                extra |= {"cold_proj": self.cold_proj.weight.detach().contiguous(),
                          "cold_head": torch.stack([self.cold_scale, self.cold_decay, self.cold_offset]).detach()}
            save_file(extra, str(path / "seqrec.safetensors"))
        if tokenizer is not None:
            tokenizer.save(path)

    @classmethod
    def from_pretrained(cls, path: Path | str) -> SeqRecLM:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        path = Path(path)
        if not (path / "seqrec.json").exists():
            raise FileNotFoundError(f"{path / 'seqrec.json'} not found: not a saved SeqRecLM")
        meta = json.loads((path / "seqrec.json").read_text())
        cfg = SeqRecConfig(**meta["config"])
        extra = load_file(str(path / "seqrec.safetensors")) if cfg.use_text else {}
        model = cls(cfg, meta["n_items"], meta["n_trained"], text_emb=extra.get("text_emb"))
        lm = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")
        model.lm.load_state_dict(lm.state_dict())
        if cfg.use_text:
            with torch.no_grad():
                model.embeddings.weight.copy_(extra["own_embeddings"])
                model.text_proj.weight.copy_(extra["text_proj"])
                if cfg.cold_head:
                    model.cold_proj.weight.copy_(extra["cold_proj"])
                    for i, t in enumerate((model.cold_scale, model.cold_decay, model.cold_offset)):
                        t.copy_(extra["cold_head"][i])
        return model
