"""DPO: fine-tune a recommender on (chosen, rejected) items against a frozen reference (Rafailov et al. 2023,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model").

    records = to_records(build_pairs(rewarded, events))          # dragonrec.preferences
    result = train_dpo(recommender, records, DPOConfig(beta=0.1, lr=1e-4, epochs=1))

The recommender is fine-tuned in place (pass `copy.deepcopy(recommender)` to keep the original); the
reference is a frozen copy of it taken when training starts, unless one is given. A "response" is one item
token, so log pi(item | history) is its log-softmax over the catalog (`preference_common`); the chosen and
the rejected item share one forward pass of the history. Group records (a list of rejected items) train as
one DPO pair per rejected item; `sdpo.py` treats them as one softmax over the group instead.
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


class DPOConfig(PreferenceTrainConfig):
    """DPO's one knob plus the shared optimisation settings."""

    beta: float = Field(0.1, gt=0)  # strength of the KL constraint to the reference (trl's default 0.1)
    use_weights: bool = True  # scale each pair's loss by its record `weight` (1.0 unless weighted by margin)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of preference pairs.

    pi_chosen, ref_chosen: [B] log pi(chosen | x) under the policy and the reference;
    pi_rejected, ref_rejected: [B] (or [B, K] for K rejected items per chosen one, with pi_chosen [B, 1]:
    any shapes that broadcast); weight: the broadcast shape, each pair's weight (0 = padding), or None = 1.
    Returns (loss: scalar, the weighted mean over pairs; chosen_rewards: beta * (pi_chosen - ref_chosen);
    rejected_rewards: beta * (pi_rejected - ref_rejected)), the rewards detached (DPO's implicit reward).
    """
    chosen_logratio = pi_chosen - ref_chosen
    rejected_logratio = pi_rejected - ref_rejected
    # L_DPO = -E[ log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]   (eq. 7)
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    if weight is None:
        loss = losses.mean()
    else:
        weight = torch.broadcast_to(weight, losses.shape).to(losses.dtype)
        loss = (losses * weight).sum() / weight.sum().clamp(min=1e-12)
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def train_dpo(recommender, records: Sequence[dict], cfg: DPOConfig | None = None,
              reference=None) -> PreferenceTrainResult:
    """Fine-tune `recommender` (a `GenerativeRecommender`/`SequentialRecommender` or a `PretrainedLMRecommender`)
    in place with DPO on preference records.

    records: `dragonrec.preferences.to_records` output, pairs or groups: history (item ids, oldest first),
    history_actions, chosen (an item id), rejected (an item id or a list), weight (a float or a list).
    reference: a frozen recommender to stay close to (None: a copy of `recommender` as it is now).
    Returns the steps, time, loss per epoch, the chosen-over-rejected margin and accuracy before and after,
    and the KL to the reference after.
    """
    cfg = cfg or DPOConfig()
    data = preference_data(recommender, records, use_weights=cfg.use_weights)

    def batch_loss(pi_c, pi_r, ref_c, ref_r, mask, weight):
        loss, chosen_rewards, rejected_rewards = dpo_loss(pi_c[:, None], pi_r, ref_c[:, None], ref_r, cfg.beta,
                                                          weight)
        margins = (chosen_rewards - rejected_rewards)[mask]
        return loss, {"reward_margin": float(margins.mean()), "reward_accuracy": float((margins > 0).float().mean())}

    return train_on_preferences(recommender, data, cfg, "dpo", batch_loss, reference)
