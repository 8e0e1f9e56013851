"""Constrained decoding: generate N recommendations with any HF causal LM, emitting only real product tokens.

`ItemConstraint` is a `transformers.LogitsProcessor`: at every generation step it leaves only product tokens
allowed, minus those already generated in the sequence (no repeats) and minus each row's exclusions (history,
out of stock, already purchased). `generate_items` runs `model.generate` with it, greedily or with beam
search over item tokens, so a list can never hold an invented id, a duplicate or an excluded item.
`score_next_items` reads the logits of every product token at the next position: a full ranking in one
forward pass.

Items are named by their position in `item_token_ids` (for `SeqRecLM`: `ITEM_OFFSET + model_id`, so the
position is the model id and `vocab.catalog_index[k]` the catalog index):

    prompts = [tok.encode(history, actions, narrative=True) for history, actions in ...]
    input_ids, mask = left_pad(prompts, pad_id=PAD_ID)
    lists = generate_items(lm.merged_causal_lm(), input_ids, ITEM_OFFSET + np.arange(n_items), n=10,
                           attention_mask=mask, exclude=[tok.item_ids(h) for h in histories], num_beams=4)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists (decoder-only generation continues at the right edge): (input_ids, attention_mask),
    both LongTensor [B, L]."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, width - len(s):] = 1
    return ids, mask


def _as_token_ids(item_token_ids) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(item_token_ids, dtype=np.int64))
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError("item_token_ids must be a non-empty 1-D list of token ids")
    if len(torch.unique(ids)) != len(ids):
        raise ValueError("item_token_ids holds duplicate token ids")
    return ids


class ItemConstraint(LogitsProcessor):
    """Sets to -inf every token that is not an allowed product token, every product token already generated
    after the prompt, and every token excluded for the row's prompt.

    item_token_ids: [n_items] the product tokens; exclude[b]: positions into item_token_ids barred for prompt b
    (or None). Rows of `input_ids` beyond the batch (beams) map to prompt `row // (rows / batch)`, as
    `generate` expands each prompt into consecutive rows.
    """

    def __init__(self, item_token_ids, prompt_length: int, exclude: Sequence[Sequence[int]] | None = None):
        self.item_token_ids = _as_token_ids(item_token_ids)
        self.prompt_length = int(prompt_length)
        self.exclude = None
        if exclude is not None:
            n = len(self.item_token_ids)
            for b, ex in enumerate(exclude):
                ex = np.asarray(list(ex), dtype=np.int64)
                if len(ex) and (ex.min() < 0 or ex.max() >= n):
                    raise ValueError(f"exclude[{b}] holds an item position outside 0..{n - 1}")
            self.exclude = [torch.as_tensor(np.asarray(list(ex), dtype=np.int64)) for ex in exclude]
        self._base: torch.Tensor | None = None  # [B, V] additive mask: 0 allowed, -inf barred

    def _base_mask(self, vocab_size: int, device, dtype) -> torch.Tensor:
        if self._base is None or self._base.shape[-1] != vocab_size or self._base.device != device:
            if int(self.item_token_ids.max()) >= vocab_size:
                raise ValueError(f"item token id {int(self.item_token_ids.max())} is past the model's vocabulary "
                                 f"({vocab_size})")
            rows = len(self.exclude) if self.exclude is not None else 1
            base = torch.full((rows, vocab_size), float("-inf"), device=device)
            base[:, self.item_token_ids.to(device)] = 0.0
            if self.exclude is not None:
                for b, ex in enumerate(self.exclude):
                    base[b, self.item_token_ids[ex].to(device)] = float("-inf")
            self._base = base
        return self._base.to(dtype)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        base = self._base_mask(scores.shape[-1], scores.device, scores.dtype)
        if base.shape[0] > 1:
            if scores.shape[0] % base.shape[0]:
                raise ValueError(f"{scores.shape[0]} rows is not a multiple of the {base.shape[0]} prompts")
            base = base.repeat_interleave(scores.shape[0] // base.shape[0], dim=0)
        out = scores + base
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1]:
            out = out.scatter(1, generated, float("-inf"))  # no item twice in one list
        return out


def generate_items(model, input_ids: torch.Tensor, item_token_ids, n: int = 10, *,
                   attention_mask: torch.Tensor | None = None, exclude: Sequence[Sequence[int]] | None = None,
                   num_beams: int = 1, pad_token_id: int = 0) -> list[list[int]]:
    """N distinct recommendations per prompt by constrained greedy (num_beams=1) or beam search.

    input_ids: [B, L] left-padded prompts (see `left_pad`); returns B lists of n positions into item_token_ids,
    in generation order. Raises ValueError when a prompt has fewer than n items left after its exclusions.
    """
    item_token_ids = _as_token_ids(item_token_ids)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    batch = input_ids.shape[0]
    if exclude is not None and len(exclude) != batch:
        raise ValueError(f"{len(exclude)} exclusion lists for {batch} prompts")
    for b in range(batch):
        left = len(item_token_ids) - (len(set(map(int, exclude[b]))) if exclude is not None else 0)
        if left < n:
            raise ValueError(f"prompt {b}: only {left} items are left after its exclusions, {n} were asked for")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    constraint = ItemConstraint(item_token_ids, input_ids.shape[1], exclude)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask.to(device), max_new_tokens=n,
                             do_sample=False, num_beams=num_beams, num_return_sequences=1,
                             logits_processor=LogitsProcessorList([constraint]), pad_token_id=pad_token_id,
                             use_cache=True)
    new = out[:, input_ids.shape[1]:].cpu()
    position = {int(t): k for k, t in enumerate(item_token_ids.tolist())}
    lists = [[position[int(t)] for t in row] for row in new]  # KeyError here would mean the constraint failed
    if any(len(row) != n for row in lists):  # generation stopped early (an EOS would have had to slip through)
        raise RuntimeError("constrained generation returned fewer items than asked for")
    return lists


def score_next_items(model, input_ids: torch.Tensor, item_token_ids, attention_mask: torch.Tensor | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """[B, n_items] logits of every product token at the position after each left-padded prompt.

    Position ids count real tokens only, so a padded prompt scores exactly as it would alone.
    """
    item_token_ids = _as_token_ids(item_token_ids)
    device = next(model.parameters()).device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = []
    with torch.no_grad():
        for s in range(0, len(input_ids), batch_size):
            ids, mask = input_ids[s:s + batch_size].to(device), attention_mask[s:s + batch_size].to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
            out.append(logits[:, item_token_ids.to(device)].float().cpu())
    return torch.cat(out)
