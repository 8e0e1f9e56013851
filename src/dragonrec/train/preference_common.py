"""What DPO, S-DPO and the policy-gradient method share: preference records -> model inputs, item
log-probabilities from either recommender, the frozen reference, one optimisation loop and its result.

A recommendation is an item token: for a history h, the model's probability of recommending catalog item i is
its share of a softmax over the catalog,

    log pi(i | h) = log_softmax(recommender.item_logits(h))[i]

where `item_logits` (on `SequentialRecommender` / `GenerativeRecommender`: `SeqRecLM.score_items`; on
`PretrainedLMRecommender`: the product-token logits after the narrative) is `score` with autograd, in catalog
order, -inf for items without a token (probability 0: never chosen, rejected nor sampled). The reference is a
deep copy of the policy when training starts (the active version), frozen and in eval mode. Dropout is off
while fine-tuning unless `dropout=True`, as trl's DPOTrainer does (`disable_dropout`): with dropout on, the
policy and the reference would differ before any step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.progress import log


class PreferenceTrainConfig(BaseModel):
    """Optimisation shared by every preference method. Defaults run on a laptop CPU."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-4, gt=0)  # AdamW learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay
    batch_size: int = Field(32, ge=1)  # records (DPO, S-DPO) or contexts (policy gradient) per step
    epochs: int = Field(1, ge=1)  # passes over the records or contexts
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimiser steps (None = all epochs)
    max_minutes: float | None = Field(None, gt=0)  # stop when this much time has passed (None = no limit)
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm (None = off)
    dropout: bool = False  # keep the model's dropout on while training (off, as trl's disable_dropout)
    eval_batch_size: int = Field(64, ge=1)  # contexts per forward pass when measuring (no gradient)
    seed: int = 0  # order of the records, sampling, dropout
    log_every: int | None = Field(None, ge=1)  # a log line every N steps as well as after each epoch
    quiet: bool = False  # no log lines


@dataclass
class PreferenceTrainResult:
    """What a preference fine-tuning run did, and how the preferences moved.

    margin: mean of log pi(chosen) - log pi(rejected) over every (record, rejected item) pair, under the model
    before and after training; accuracy: the share of those pairs where the chosen item is more probable.
    kl_after: mean KL(pi || reference) over the training contexts of the distribution the method trains
    (the whole catalog for DPO/S-DPO; history excluded, at the sampling temperature, for policy gradient).
    reward_before/after (policy gradient): mean reward of the model's top-n list (history excluded) per context.
    """

    method: str
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0  # records (or contexts) trained on
    dropped: int = 0  # records dropped: chosen item unknown or without a token, or no scorable rejected item
    epoch_loss: list[float] = field(default_factory=list)
    margin_before: float | None = None
    margin_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    kl_after: float | None = None
    reward_before: float | None = None
    reward_after: float | None = None
    history: list[dict] = field(default_factory=list)  # one entry per epoch: loss and the method's batch stats
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- records -> model inputs ---------------------------------------------------------------------------------

@dataclass
class PreferenceData:
    """Preference records in catalog indices, ready for `item_logits`.

    histories[b]: catalog indices, oldest first; actions[b]: the action names aligned with it (None: unknown);
    chosen: [N]; rejected: [N, K] padded with -1; weight: [N, K] per (chosen, rejected) pair, 0 at padding.
    """

    histories: list[np.ndarray]
    actions: list[np.ndarray] | None
    chosen: np.ndarray
    rejected: np.ndarray
    weight: np.ndarray
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def mask(self) -> np.ndarray:
        """[N, K] True where a rejected item is present."""
        return self.rejected >= 0

    def context(self, idx: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        return [self.histories[i] for i in idx], None if self.actions is None else [self.actions[i] for i in idx]


def _catalog_indexer(catalog) -> pd.Index:
    return pd.Index(np.asarray(catalog.item_ids).astype(str))


def _lookup(index: pd.Index, ids) -> np.ndarray:
    ids = list(ids)
    if not ids:
        return np.zeros(0, dtype=np.int64)
    return index.get_indexer([str(x) for x in ids]).astype(np.int64)


def _as_list(v) -> list:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]


def _contexts(records: Sequence[dict], index: pd.Index) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Each record's history as catalog indices (unknown items dropped with their actions)."""
    has_actions = [r.get("history_actions") is not None for r in records]
    if any(has_actions) and not all(has_actions):
        raise ValueError("some records have history_actions and some do not: give them for all or none")
    histories, actions = [], [] if all(has_actions) else None
    for r in records:
        hist = _as_list(r.get("history"))
        rows = _lookup(index, hist)
        keep = rows >= 0
        histories.append(rows[keep])
        if actions is not None:
            acts = np.asarray(_as_list(r["history_actions"]), dtype=object)
            if len(acts) != len(hist):
                raise ValueError(f"a record has {len(hist)} history items and {len(acts)} history_actions")
            actions.append(acts[keep])
    return histories, actions


def scorable_items(recommender) -> np.ndarray:
    """[len(catalog)] True for items the model can recommend (they have a token): finite item logits."""
    with torch.no_grad(), eval_mode(recommender):
        logits = recommender.item_logits([np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=object)])
    return torch.isfinite(logits[0]).cpu().numpy()


def preference_data(recommender, records: Sequence[dict], max_negatives: int | None = None,
                    use_weights: bool = True) -> PreferenceData:
    """Records of `dragonrec.preferences.to_records` (pairs or groups) in the recommender's catalog indices.

    A rejected item that is unknown or has no token is left out; a record whose chosen item is unknown or has no
    token, or that keeps no rejected item, is dropped (counted in `dropped`). `max_negatives` keeps the first K
    rejected items of a group (records list them in position order). Without `use_weights` every pair weighs 1.
    """
    index = _catalog_indexer(recommender.catalog)
    ok = scorable_items(recommender)
    keep, chosen, rejected, weights = [], [], [], []
    for n, r in enumerate(records):
        c = _lookup(index, [r["chosen"]])[0]
        rej = _as_list(r["rejected"])
        w = _as_list(r.get("weight", 1.0)) if use_weights else [1.0]
        if len(w) == 1 and len(rej) > 1:
            w = w * len(rej)
        if len(w) != len(rej):
            raise ValueError(f"record {n}: {len(rej)} rejected items and {len(w)} weights")
        rows = _lookup(index, rej)
        good = (rows >= 0) & (rows != c)
        good[good] &= ok[rows[good]]
        rows, w = rows[good], np.asarray(w, dtype=np.float64)[good]
        if max_negatives is not None:
            rows, w = rows[:max_negatives], w[:max_negatives]
        if c < 0 or not ok[c] or not len(rows):
            continue
        keep.append(n)
        chosen.append(c)
        rejected.append(rows)
        weights.append(w)
    if not keep:
        raise ValueError(f"none of {len(records)} preference records has a chosen and a rejected item the "
                         "model can score (unknown items, or items without a token)")
    width = max(len(r) for r in rejected)
    rej = np.full((len(keep), width), -1, dtype=np.int64)
    wt = np.zeros((len(keep), width), dtype=np.float64)
    for b, (r, w) in enumerate(zip(rejected, weights)):
        rej[b, :len(r)], wt[b, :len(w)] = r, w
    histories, actions = _contexts([records[n] for n in keep], index)
    return PreferenceData(histories, actions, np.asarray(chosen, dtype=np.int64), rej, wt,
                          dropped=len(records) - len(keep))


def contexts_from_records(records: Sequence[dict], catalog) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The distinct (user, history) contexts of preference records, as catalog indices and actions: the
    contexts a policy-gradient run can sample lists for."""
    seen, unique = set(), []
    for r in records:
        key = (str(r.get("user_id")), tuple(map(str, _as_list(r.get("history")))),
               tuple(map(str, _as_list(r.get("history_actions")))))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return _contexts(unique, _catalog_indexer(catalog))


# ---- log-probabilities ---------------------------------------------------------------------------------------

def mask_items(logits: torch.Tensor, exclude: Sequence[np.ndarray] | None) -> torch.Tensor:
    """[B, C] logits with each row's `exclude[b]` catalog indices set to -inf (out of place)."""
    if exclude is None:
        return logits
    rows = np.concatenate([np.full(len(e), b) for b, e in enumerate(exclude)] + [np.zeros(0)]).astype(np.int64)
    cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude] + [np.zeros(0, dtype=np.int64)])
    if not len(cols):
        return logits
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    mask[torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)] = True
    return logits.masked_fill(mask, -math.inf)


def pick(logp: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """logp [B, C], items [B] or [B, K] catalog indices (-1 = padding) -> the picked values (0 at padding)."""
    flat = items.unsqueeze(1) if items.ndim == 1 else items
    out = logp.gather(1, flat.clamp(min=0)).masked_fill(flat < 0, 0.0)
    return out[:, 0] if items.ndim == 1 else out


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """[B] exact KL(softmax(logits) || softmax(ref_logits)) per row over the items the policy can pick.

    logits, ref_logits: [B, C], -inf where an item is out (no token, or excluded). Zero, with zero gradient,
    when both are equal. Items out of the policy's support contribute 0 (their probability is 0).
    """
    logp = F.log_softmax(logits, dim=-1)
    logq = F.log_softmax(ref_logits, dim=-1)
    support = torch.isfinite(logits)
    # masked_fill, not where: a -inf - -inf on an unused entry would make the gradient NaN
    diff = logp.masked_fill(~support, 0.0) - logq.masked_fill(~support, 0.0)
    return (logp.exp() * diff).sum(-1)


# ---- the policy, the reference, the modes ----------------------------------------------------------------------

def frozen_reference(recommender):
    """A copy of the recommender whose model is a deep copy of the current weights, in eval mode, without
    gradients: the reference a preference method is kept close to. Catalog, tokenizer and config are shared."""
    ref = copy.copy(recommender)
    ref.model = copy.deepcopy(recommender.model).eval()
    ref.model.requires_grad_(False)
    if hasattr(ref, "_merged"):  # the sequential recommender's cached model for generate(): rebuilt on use
        ref._merged = None
    return ref


def trainable_parameters(recommender) -> list[torch.nn.Parameter]:
    """The parameters preference training updates: those that require gradients (the whole `SeqRecLM`; the
    LoRA adapters and product-token rows of a peft model). A peft model loaded for inference (every adapter
    frozen) gets its adapter parameters unfrozen, as `PeftModel.from_pretrained(is_trainable=True)` would."""
    model = recommender.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params and hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            if "lora_" in name or "trainable_tokens" in name:
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(recommender).__name__}'s model has no trainable parameter")
    return params


@contextmanager
def eval_mode(recommender):
    model = recommender.model
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextmanager
def policy_mode(recommender, dropout: bool = False):
    """The model in train mode (dropout on) or, by default, in eval mode with gradients; restored after."""
    model = recommender.model
    was = model.training
    model.train(dropout)
    try:
        with torch.enable_grad():
            yield model
    finally:
        model.train(was)


def check_reference(recommender, reference) -> None:
    if len(reference.catalog) != len(recommender.catalog):
        raise ValueError(f"the reference scores {len(reference.catalog)} items, the policy {len(recommender.catalog)}")


# ---- measuring ---------------------------------------------------------------------------------------------

@torch.no_grad()
def chosen_rejected_log_probs(recommender, data: PreferenceData, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(log pi(chosen) [N], log pi(rejected) [N, K], 0 at padding) under the model in eval mode."""
    c_out, r_out = [], []
    with eval_mode(recommender):
        for s in range(0, len(data), batch_size):
            idx = np.arange(s, min(s + batch_size, len(data)))
            logp = F.log_softmax(recommender.item_logits(*data.context(idx)).float(), dim=-1)
            c_out.append(pick(logp, torch.as_tensor(data.chosen[idx], device=logp.device)).cpu())
            r_out.append(pick(logp, torch.as_tensor(data.rejected[idx], device=logp.device)).cpu())
    return torch.cat(c_out).numpy(), torch.cat(r_out).numpy()


def pair_stats(chosen_logp: np.ndarray, rejected_logp: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean log pi(chosen) - log pi(rejected), share of pairs with the chosen item more probable) over pairs."""
    diff = (chosen_logp[:, None] - rejected_logp)[mask]
    return float(diff.mean()), float((diff > 0).mean())


@torch.no_grad()
def mean_kl(recommender, reference, histories, actions, batch_size: int, exclude_history: bool = False,
            temperature: float = 1.0) -> float:
    """Mean over contexts of KL(pi || reference) of softmax(item_logits / temperature), history excluded or not."""
    total = 0.0
    with eval_mode(recommender):
        for s in range(0, len(histories), batch_size):
            h = histories[s:s + batch_size]
            a = None if actions is None else actions[s:s + batch_size]
            ex = h if exclude_history else None
            pi = mask_items(recommender.item_logits(h, a).float() / temperature, ex)
            ref = mask_items(reference.item_logits(h, a).float().to(pi.device) / temperature, ex)
            total += float(kl_to_reference(pi, ref).sum())
    return total / max(len(histories), 1)


# ---- the optimisation loop ---------------------------------------------------------------------------------

StepFn = Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]]


def run_training(params: list[torch.nn.Parameter], n_examples: int, step_fn: StepFn, cfg: PreferenceTrainConfig,
                 label: str) -> tuple[list[dict], int, float]:
    """AdamW over shuffled batches of example indices for `cfg.epochs` (or `max_steps`, or `max_minutes`).

    step_fn(idx) returns (loss, stats) for one batch; stats are averaged per epoch into the history.
    Returns (history: one dict per epoch, steps, seconds). A non-finite loss stops with FloatingPointError.
    """
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    step, history, stop = 0, [], False
    for epoch in range(1, cfg.epochs + 1):
        sums: dict[str, float] = {}
        n_batches = 0
        order = rng.permutation(n_examples)
        for s in range(0, n_examples, cfg.batch_size):
            loss, stats = step_fn(order[s:s + cfg.batch_size])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: the loss is {float(loss)} at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            n_batches += 1
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v
            if cfg.log_every and step % cfg.log_every == 0:
                log(None, f"{label} epoch {epoch}/{cfg.epochs} step {step} loss {float(loss.detach()):.4f} "
                          f"{time.perf_counter() - t0:.0f}s", cfg.quiet)
            out_of_time = cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes
            if (cfg.max_steps is not None and step >= cfg.max_steps) or out_of_time:
                stop = True
                break
        entry = {"epoch": epoch, "steps": step, **{k: v / max(n_batches, 1) for k, v in sums.items()},
                 "elapsed_s": time.perf_counter() - t0}
        history.append(entry)
        shown = " ".join(f"{k} {v:.4f}" for k, v in entry.items() if k not in ("epoch", "steps", "elapsed_s"))
        log(None, f"{label} epoch {epoch}/{cfg.epochs} step {step} {shown} {entry['elapsed_s']:.0f}s", cfg.quiet)
        if stop:
            break
    return history, step, time.perf_counter() - t0


def train_on_preferences(recommender, data: PreferenceData, cfg: PreferenceTrainConfig, method: str,
                         batch_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]],
                         reference=None) -> PreferenceTrainResult:
    """The frame DPO and S-DPO share: reference log-probabilities computed once, then `run_training` with
    batch_loss(pi_chosen [B], pi_rejected [B, K], ref_chosen [B], ref_rejected [B, K], mask [B, K],
    weight [B, K]) -> (loss, stats), then the margins before and after and the KL to the reference."""
    torch.manual_seed(cfg.seed)
    own_reference = reference is None
    reference = frozen_reference(recommender) if own_reference else reference
    check_reference(recommender, reference)
    params = trainable_parameters(recommender)
    mask = data.mask
    ref_c, ref_r = chosen_rejected_log_probs(reference, data, cfg.eval_batch_size)
    if own_reference:  # the policy is the reference's copy: its log-probabilities are the same
        pol_c, pol_r = ref_c, ref_r
    else:
        pol_c, pol_r = chosen_rejected_log_probs(recommender, data, cfg.eval_batch_size)
    res = PreferenceTrainResult(method=method, examples=len(data), dropped=data.dropped, config=cfg.model_dump())
    res.margin_before, res.accuracy_before = pair_stats(pol_c, pol_r, mask)
    if data.dropped:
        log(None, f"{method}: {data.dropped} records dropped (items unknown to the model or without a token)",
            cfg.quiet)
    device = next(recommender.model.parameters()).device

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)

    def step(idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        logp = F.log_softmax(recommender.item_logits(*data.context(idx)).float(), dim=-1)
        pi_c, pi_r = pick(logp, t(data.chosen[idx])), pick(logp, t(data.rejected[idx]))
        return batch_loss(pi_c, pi_r, t(ref_c[idx]).float(), t(ref_r[idx]).float(), t(mask[idx]),
                          t(data.weight[idx]).float())

    with policy_mode(recommender, cfg.dropout):
        res.history, res.steps, res.seconds = run_training(params, len(data), step, cfg, method)
    res.epoch_loss = [h["loss"] for h in res.history]
    pol_c, pol_r = chosen_rejected_log_probs(recommender, data, cfg.eval_batch_size)
    res.margin_after, res.accuracy_after = pair_stats(pol_c, pol_r, mask)
    res.kl_after = mean_kl(recommender, reference, data.histories, data.actions, cfg.eval_batch_size)
    log(None, f"{method}: margin {res.margin_before:.4f} -> {res.margin_after:.4f}, accuracy "
              f"{res.accuracy_before:.3f} -> {res.accuracy_after:.3f}, KL to reference {res.kl_after:.4f}", cfg.quiet)
    return res
