"""Policy gradient on recommendation lists: sample lists from the model, score them with a reward function,
and follow REINFORCE with a group baseline (GRPO-style) and a KL penalty to a frozen reference.

    histories, actions = contexts_from_records(records, recommender.catalog)   # or any catalog-index histories
    result = train_pg(recommender, (histories, actions), reward_fn, PGConfig(n=10, group_size=8, kl_coef=0.05))

The policy: for a history, softmax(item_logits / temperature) over the catalog with the history's items
excluded; a list of n items is a Plackett-Luce sample without replacement from it (drawn with the Gumbel-top-k
trick, Kool et al. 2019), whose log-probability is exact and differentiable. REINFORCE (Williams 1992,
"Simple statistical gradient-following algorithms for connectionist reinforcement learning") raises the
log-probability of lists in proportion to their advantage; as in GRPO (Shao et al. 2024, "DeepSeekMath"),
`group_size` lists are sampled per context and each list's baseline is the mean reward of its group (divided
by the group's standard deviation with `scale_rewards`). One gradient step per sampled batch keeps GRPO's
importance ratio at 1, where its clipped objective has exactly this gradient. The KL penalty is the exact KL
of the policy's item distribution to the reference's (a sum over the catalog, no sampling estimate).

reward_fn(histories, actions, lists) -> rewards: histories[b] catalog indices (oldest first), actions[b] the
action names aligned with it (or actions None), lists [B, n] catalog indices (best first); returns [B, n]
per-slot rewards (a list earns their sum) or [B] per-list rewards. The caller wraps the reward model or the
simulator in it. Written in PyTorch (trl's GRPOTrainer samples text; our policy samples item tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from pydantic import Field

from dragonrec.progress import log
from dragonrec.train.preference_common import (
    PreferenceTrainConfig,
    PreferenceTrainResult,
    eval_mode,
    frozen_reference,
    kl_to_reference,
    mask_items,
    mean_kl,
    policy_mode,
    run_training,
    trainable_parameters,
)

RewardFn = Callable[[list[np.ndarray], list[np.ndarray] | None, np.ndarray], np.ndarray]
_OUT = -1e9  # an item already placed in the list: exp of it is 0, and unlike -inf it keeps gradients finite


class PGConfig(PreferenceTrainConfig):
    """Sampling, baseline and KL settings plus the shared optimisation settings (batch_size counts contexts)."""

    batch_size: int = Field(16, ge=1)  # contexts per step, each with `group_size` sampled lists
    n: int = Field(10, ge=1)  # items per sampled list
    group_size: int = Field(8, ge=2)  # lists sampled per context; their mean reward is each one's baseline
    temperature: float = Field(1.0, gt=0)  # sampling temperature of softmax(item_logits / temperature)
    kl_coef: float = Field(0.05, ge=0)  # weight of KL(policy || reference) in the loss
    scale_rewards: bool = True  # divide advantages by the group's reward standard deviation (GRPO)
    exclude_history: bool = True  # never sample an item of the context's history (as the service serves)


def sample_lists(logits: torch.Tensor, n: int, group_size: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, group_size, n] catalog indices: Plackett-Luce samples without replacement from softmax(logits).

    logits: [B, C], -inf for items that may not be drawn (each row needs at least n finite ones). Adding
    Gumbel noise and keeping the top n in order draws exactly such a sample (Gumbel-top-k, Kool et al. 2019).
    """
    logits = logits.detach().float().cpu()
    finite = torch.isfinite(logits).sum(1)
    if (finite < n).any():
        b = int(torch.nonzero(finite < n)[0, 0])
        raise ValueError(f"context {b} has {int(finite[b])} items to sample from, fewer than n={n}")
    exp = torch.empty((logits.shape[0], group_size, logits.shape[1])).exponential_(generator=generator)
    return (logits[:, None, :] - exp.log()).topk(n, dim=-1).indices  # -log Exp(1) is Gumbel(0, 1)


def plackett_luce_log_prob(logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """[B, G] log-probability of each list under Plackett-Luce sampling without replacement from softmax(logits).

    logits: [B, C] (-inf = never drawn); lists: [B, G, n] catalog indices, first drawn first.
    log P(i_1..i_n) = sum_j [ z_{i_j} - log sum_{k not in i_1..i_{j-1}} exp z_k ]
    """
    B, G, n = lists.shape
    picked = logits.gather(1, lists.reshape(B, G * n)).reshape(B, G, n)
    placed = torch.zeros((B, G, logits.shape[1]), dtype=torch.bool, device=logits.device).scatter_(2, lists, True)
    rest = torch.logsumexp(logits[:, None, :].masked_fill(placed, _OUT), dim=-1)  # items outside the list
    after = torch.logcumsumexp(picked.flip(-1), dim=-1).flip(-1)  # log sum over the list's items j..n
    return (picked - torch.logaddexp(rest[..., None], after)).sum(-1)


def pg_loss(list_log_prob: torch.Tensor, rewards: torch.Tensor, kl: torch.Tensor | None = None,
            kl_coef: float = 0.0, scale_rewards: bool = True,
            eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with the group-mean baseline of GRPO, plus a KL penalty.

    list_log_prob: [B, G] log pi(list) of G lists sampled for each of B contexts (with gradient);
    rewards: [B, G] what each list earned; kl: [B] KL(pi || reference) per context (or None).
    Returns (loss: scalar, advantages [B, G], detached).
    """
    baseline = rewards.mean(dim=1, keepdim=True)  # b(x) = mean_g r(x, y_g)                          (GRPO)
    advantages = rewards - baseline
    if scale_rewards:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + eps)  # A_g = (r_g - mean r) / std r
    advantages = advantages.detach().to(list_log_prob.dtype)
    # grad J = E[ (r - b) grad log pi(y | x) ]                                             (Williams 1992)
    loss = -(advantages * list_log_prob).mean()
    if kl is not None and kl_coef:
        loss = loss + kl_coef * kl.mean()  # - beta KL(pi || pi_ref) in the objective
    return loss, advantages


def list_rewards(reward_fn: RewardFn, histories: list[np.ndarray], actions: list[np.ndarray] | None,
                 lists: np.ndarray) -> np.ndarray:
    """[B, G] the reward of each list: reward_fn's per-slot rewards summed, or its per-list rewards.

    lists: [B, G, n]; reward_fn sees B * G rows, each context repeated G times in a row."""
    B, G, n = lists.shape
    hist = [h for h in histories for _ in range(G)]
    acts = None if actions is None else [a for a in actions for _ in range(G)]
    r = np.asarray(reward_fn(hist, acts, lists.reshape(B * G, n)), dtype=np.float64)
    if r.shape == (B * G, n):
        r = r.sum(axis=1)
    elif r.shape != (B * G,):
        raise ValueError(f"reward_fn returned shape {r.shape}; expected {(B * G, n)} per slot or {(B * G,)} per list")
    return r.reshape(B, G)


@torch.no_grad()
def top_n_reward(recommender, histories: Sequence[np.ndarray], actions, reward_fn: RewardFn, n: int,
                 batch_size: int, exclude_history: bool = True) -> float:
    """Mean reward of the model's top-n list (what the service shows) over the contexts."""
    total = 0.0
    with eval_mode(recommender):
        for s in range(0, len(histories), batch_size):
            h = list(histories[s:s + batch_size])
            a = None if actions is None else list(actions[s:s + batch_size])
            logits = mask_items(recommender.item_logits(h, a).float(), h if exclude_history else None)
            top = logits.topk(n, dim=-1).indices.cpu().numpy()
            total += float(list_rewards(reward_fn, h, a, top[:, None, :]).sum())
    return total / max(len(histories), 1)


def train_pg(recommender, contexts: tuple[Sequence[np.ndarray], Sequence[np.ndarray] | None], reward_fn: RewardFn,
             cfg: PGConfig | None = None, reference=None) -> PreferenceTrainResult:
    """Fine-tune `recommender` (a `GenerativeRecommender`/`SequentialRecommender` or a `PretrainedLMRecommender`)
    in place by policy gradient on sampled lists.

    contexts: (histories, actions): histories[b] catalog indices, oldest first; actions[b] the action names
    aligned with it, or None for all (`preference_common.contexts_from_records` turns preference records into
    these). reward_fn: see the module docstring. reference: a frozen recommender for the KL penalty (None: a
    copy of `recommender` as it is now). Returns steps, time, loss per epoch (with the mean sampled reward and
    KL per epoch in `history`), the mean top-n reward before and after, and the KL to the reference after.
    """
    cfg = cfg or PGConfig()
    histories = [np.asarray(h, dtype=np.int64) for h in contexts[0]]
    actions = None if contexts[1] is None else [np.asarray(a, dtype=object) for a in contexts[1]]
    if not histories:
        raise ValueError("train_pg: no contexts to sample lists for")
    if actions is not None and len(actions) != len(histories):
        raise ValueError(f"train_pg: {len(histories)} histories and {len(actions)} action lists")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    reference = frozen_reference(recommender) if reference is None else reference
    params = trainable_parameters(recommender)
    res = PreferenceTrainResult(method="pg", examples=len(histories), config=cfg.model_dump())
    res.reward_before = top_n_reward(recommender, histories, actions, reward_fn, cfg.n, cfg.eval_batch_size,
                                     cfg.exclude_history)

    def step(idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        h = [histories[i] for i in idx]
        a = None if actions is None else [actions[i] for i in idx]
        excluded = h if cfg.exclude_history else None
        z = mask_items(recommender.item_logits(h, a).float() / cfg.temperature, excluded)
        with torch.no_grad():
            z_ref = mask_items(reference.item_logits(h, a).float().to(z.device) / cfg.temperature, excluded)
        lists = sample_lists(z, cfg.n, cfg.group_size, generator)
        rewards = torch.as_tensor(list_rewards(reward_fn, h, a, lists.numpy()), device=z.device, dtype=z.dtype)
        kl = kl_to_reference(z, z_ref)
        loss, _ = pg_loss(plackett_luce_log_prob(z, lists.to(z.device)), rewards, kl, cfg.kl_coef, cfg.scale_rewards)
        return loss, {"reward": float(rewards.mean()), "kl": float(kl.detach().mean())}

    with policy_mode(recommender, cfg.dropout):
        res.history, res.steps, res.seconds = run_training(params, len(histories), step, cfg, "pg")
    res.epoch_loss = [e["loss"] for e in res.history]
    res.reward_after = top_n_reward(recommender, histories, actions, reward_fn, cfg.n, cfg.eval_batch_size,
                                    cfg.exclude_history)
    res.kl_after = mean_kl(recommender, reference, histories, actions, cfg.eval_batch_size,
                           exclude_history=cfg.exclude_history, temperature=cfg.temperature)
    log(None, f"pg: top-{cfg.n} reward {res.reward_before:.4f} -> {res.reward_after:.4f}, "
              f"KL to reference {res.kl_after:.4f}", cfg.quiet)
    return res
