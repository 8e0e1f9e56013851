"""Multi-negative DPO: one chosen item against every rejected item of its impression at once (S-DPO, Chen et
al. 2024, "On Softmax Direct Preference Optimization for Recommendation").

    groups = to_records(build_groups(rewarded, events))          # dragonrec.preferences
    result = train_sdpo(recommender, groups, SDPOConfig(beta=0.1, max_negatives=8))

S-DPO replaces DPO's pairwise Bradley-Terry comparison with a Plackett-Luce one of the chosen item over a set
of rejected ones: the rejected items compete in one log-sum-exp, so the most over-rated ones (hard negatives)
get most of the gradient. With one rejected item it is exactly DPO. Fine-tunes in place against a frozen copy
of the recommender taken when training starts, as `dpo.train_dpo` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from dragonrec.train.preference_common import (
    PreferenceTrainConfig,
    PreferenceTrainResult,
    preference_data,
    train_on_preferences,
)

_OUT = -1e9  # a padded negative's term: exp of it is 0, and unlike -inf it keeps the gradient finite


class SDPOConfig(PreferenceTrainConfig):
    """S-DPO's knobs plus the shared optimisation settings."""

    beta: float = Field(0.1, gt=0)  # strength of the KL constraint to the reference, as in DPO
    max_negatives: int | None = Field(None, ge=1)  # rejected items kept per group, in position order (None = all)
    use_weights: bool = True  # scale each group's loss by the mean `weight` of its pairs


def sdpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float, mask: torch.Tensor | None = None,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """The S-DPO loss of a batch of groups, one chosen item against K rejected ones.

    pi_chosen, ref_chosen: [B] log pi(chosen | x) under the policy and the reference;
    pi_rejected, ref_rejected: [B, K] log pi(rejected_k | x); mask: [B, K] bool, False where a group has fewer
    than K rejected items (None = all present); weight: [B] per group (None = 1). Returns the weighted mean
    loss (a scalar). A group without any rejected item contributes 0.
    """
    chosen_logratio = pi_chosen - ref_chosen  # [B]
    rejected_logratio = pi_rejected - ref_rejected  # [B, K]
    inner = beta * (rejected_logratio - chosen_logratio[:, None])
    if mask is not None:
        inner = inner.masked_fill(~mask, _OUT)
    # L_S-DPO = -E[ log sigma( -log sum_k exp( beta log pi(e_k|x)/pi_ref(e_k|x) - beta log pi(e_p|x)/pi_ref(e_p|x) ) ) ]
    losses = -F.logsigmoid(-torch.logsumexp(inner, dim=1))
    if weight is None:
        return losses.mean()
    weight = weight.to(losses.dtype)
    return (losses * weight).sum() / weight.sum().clamp(min=1e-12)


def train_sdpo(recommender, group_records: Sequence[dict], cfg: SDPOConfig | None = None,
               reference=None) -> PreferenceTrainResult:
    """Fine-tune `recommender` (a `GenerativeRecommender`/`SequentialRecommender` or a `PretrainedLMRecommender`)
    in place with S-DPO.

    group_records: `dragonrec.preferences.to_records(build_groups(...))` (rejected: a list of item ids, weight a
    list aligned with it); pair records work too (one rejected item each: DPO). reference: a frozen recommender
    to stay close to (None: a copy of `recommender` as it is now). Returns steps, time, loss per epoch, the
    chosen-over-rejected margin and accuracy over all (chosen, rejected) pairs before and after, and the KL
    to the reference after.
    """
    cfg = cfg or SDPOConfig()
    data = preference_data(recommender, group_records, max_negatives=cfg.max_negatives, use_weights=cfg.use_weights)

    def batch_loss(pi_c, pi_r, ref_c, ref_r, mask, weight):
        group_weight = weight.sum(1) / mask.sum(1).clamp(min=1)
        loss = sdpo_loss(pi_c, pi_r, ref_c, ref_r, cfg.beta, mask, group_weight)
        with torch.no_grad():
            margins = cfg.beta * ((pi_c - ref_c)[:, None] - (pi_r - ref_r))[mask]
        return loss, {"reward_margin": float(margins.mean()), "reward_accuracy": float((margins > 0).float().mean())}

    return train_on_preferences(recommender, data, cfg, "sdpo", batch_loss, reference)
