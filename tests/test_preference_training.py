"""Preference fine-tuning (train/dpo.py, sdpo.py, pg.py): the pure losses on hand-computed numbers, one DPO step
moving the margin the right way, S-DPO = DPO for one negative, the KL term zero against itself, the policy
gradient pushing up above-baseline items; then short runs that flip the model's preference on a tiny
generative recommender (60 users of Amazon Beauty, preference data through `dragonrec.preferences`) and on a
tiny pretrained-lm recommender (LoRA on a small random Qwen2, the chain data), saved and reloaded included."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import beauty_first_users, chain_events, chain_items

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.preferences import build_groups, build_pairs, to_records
from dragonrec.rewards import RewardConfig, attribute, rewards
from dragonrec.schema import Impression
from dragonrec.train import (
    DPOConfig,
    PGConfig,
    SDPOConfig,
    contexts_from_records,
    dpo_loss,
    pg_loss,
    sdpo_loss,
    train_dpo,
    train_pg,
    train_sdpo,
)
from dragonrec.train.pg import plackett_luce_log_prob, sample_lists
from dragonrec.train.preference_common import (
    frozen_reference,
    kl_to_reference,
    preference_data,
    trainable_parameters,
)

torch.set_num_threads(1)


# ---- the pure losses, by hand ---------------------------------------------------------------------------------

def test_dpo_loss_on_hand_computed_numbers():
    pi_c, pi_r = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    ref_c, ref_r = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, chosen_rewards, rejected_rewards = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # pair 1: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5 -> -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    # pair 2: no change from the reference -> log 2 = 0.693147
    assert float(loss) == pytest.approx((0.4740770 + 0.6931472) / 2, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.25, 0.0]) and rejected_rewards.tolist() == pytest.approx([-0.25, 0.0])
    weighted, _, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, weight=torch.tensor([3.0, 1.0]))
    assert float(weighted) == pytest.approx((3 * 0.4740770 + 0.6931472) / 4, abs=1e-6)
    # the gradient raises the chosen log-probability and lowers the rejected one
    pi_c.requires_grad_(True)
    pi_r.requires_grad_(True)
    dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)[0].backward()
    assert (pi_c.grad < 0).all() and (pi_r.grad > 0).all()


def test_sdpo_loss_on_hand_computed_numbers_and_padding():
    zero = torch.zeros(1)
    # nothing moved from the reference, two negatives: -log sigmoid(-log(e^0 + e^0)) = log(1 + 2) = log 3
    assert float(sdpo_loss(zero, torch.zeros(1, 2), zero, torch.zeros(1, 2), beta=1.0)) == pytest.approx(math.log(3))
    # a third, padded negative with a huge log-ratio changes nothing
    pi_r = torch.tensor([[0.0, 0.0, 50.0]])
    mask = torch.tensor([[True, True, False]])
    assert float(sdpo_loss(zero, pi_r, zero, torch.zeros(1, 3), 1.0, mask)) == pytest.approx(math.log(3))
    # chosen up by 1, rejected down by 1 and unchanged, beta 0.5: -log sigmoid(-log(e^-1 + e^-0.5))
    loss = sdpo_loss(torch.tensor([1.0]), torch.tensor([[-1.0, 0.0]]), zero, torch.zeros(1, 2), 0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0) + math.exp(-0.5)), abs=1e-6)
    # a group with no negative at all costs nothing and keeps gradients finite
    pi_c = torch.tensor([0.3], requires_grad=True)
    empty = sdpo_loss(pi_c, torch.zeros(1, 2), zero, torch.zeros(1, 2), 1.0, torch.zeros(1, 2, dtype=torch.bool))
    empty.backward()
    assert float(empty.detach()) == pytest.approx(0.0, abs=1e-6) and torch.isfinite(pi_c.grad).all()


def test_sdpo_equals_dpo_for_one_negative():
    g = torch.Generator().manual_seed(0)
    pi_c, ref_c, ref_r = (torch.randn(16, generator=g) for _ in range(3))
    pi_r = torch.randn(16, generator=g)
    a_c, a_r = pi_c.clone().requires_grad_(True), pi_r.clone().requires_grad_(True)
    b_c, b_r = pi_c.clone().requires_grad_(True), pi_r.clone().requires_grad_(True)
    dpo = dpo_loss(a_c, a_r, ref_c, ref_r, beta=0.3)[0]
    sdpo = sdpo_loss(b_c, b_r[:, None], ref_c, ref_r[:, None], beta=0.3)
    assert float(sdpo.detach()) == pytest.approx(float(dpo.detach()), abs=1e-6)
    dpo.backward()
    sdpo.backward()
    torch.testing.assert_close(a_c.grad, b_c.grad)
    torch.testing.assert_close(a_r.grad, b_r.grad)


def test_kl_term_is_zero_against_itself_and_positive_otherwise():
    logits = torch.tensor([[1.0, 0.5, -np.inf, 2.0], [0.0, 0.0, 0.0, -np.inf]], requires_grad=True)
    kl = kl_to_reference(logits, logits.detach())
    kl.sum().backward()
    assert kl.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() < 1e-6  # no NaN from the -inf items
    other = torch.tensor([[0.0, 0.0, -np.inf, 0.0], [1.0, 0.0, 0.0, -np.inf]])
    p = torch.softmax(logits.detach()[0, [0, 1, 3]], 0)
    by_hand = float((p * (p.log() - math.log(1 / 3))).sum())  # KL to the uniform over the 3 allowed items
    got = kl_to_reference(logits.detach(), other)
    assert float(got[0]) == pytest.approx(by_hand, abs=1e-6) and float(got[1]) > 0


def test_plackett_luce_log_prob_by_hand_and_sampling_follows_it():
    logits = torch.tensor([[0.0, 0.0, 0.0, -np.inf]])
    lists = torch.tensor([[[0, 1], [2, 0]]])
    # 1/3 for the first pick, then 1/2 among the two left (the -inf item never counts)
    assert plackett_luce_log_prob(logits, lists).tolist()[0] == pytest.approx([-math.log(6)] * 2, abs=1e-6)
    skewed = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])  # softmax 0.6, 0.3, 0.1
    # P(1, 0) = 0.3 * 0.6 / (0.6 + 0.1) ; P(2, 1, 0) = 0.1 * 0.3 / 0.9 * 1
    got = plackett_luce_log_prob(skewed, torch.tensor([[[1, 0]]]))
    assert float(got[0, 0]) == pytest.approx(math.log(0.3 * 0.6 / 0.7), abs=1e-6)
    got = plackett_luce_log_prob(skewed, torch.tensor([[[2, 1, 0]]]))
    assert float(got[0, 0]) == pytest.approx(math.log(0.1 * 0.3 / 0.9), abs=1e-6)

    samples = sample_lists(skewed, n=2, group_size=20000, generator=torch.Generator().manual_seed(0))[0]
    assert (samples[:, 0] != samples[:, 1]).all()  # without replacement
    first = np.bincount(samples[:, 0].numpy(), minlength=3) / len(samples)
    assert first == pytest.approx([0.6, 0.3, 0.1], abs=0.015)
    p_10 = float(((samples[:, 0] == 1) & (samples[:, 1] == 0)).float().mean())
    assert p_10 == pytest.approx(0.3 * 0.6 / 0.7, abs=0.015)
    masked = sample_lists(torch.tensor([[0.0, -np.inf, 0.0, 0.0]]), n=3, group_size=50)
    assert not (masked == 1).any()
    with pytest.raises(ValueError, match="fewer than n=4"):
        sample_lists(torch.tensor([[0.0, -np.inf, 0.0, 0.0]]), n=4, group_size=1)


def test_pg_loss_gradient_pushes_up_items_with_above_baseline_reward():
    logits = torch.zeros(1, 3, requires_grad=True)
    lists = torch.tensor([[[0], [1], [2]]])  # three one-item lists sampled for one context
    rewards = torch.tensor([[1.0, 0.0, 0.0]])  # baseline 1/3: item 0 is above it
    loss, adv = pg_loss(plackett_luce_log_prob(logits, lists), rewards, scale_rewards=False)
    loss.backward()
    assert adv.tolist()[0] == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    # d loss / d z_j = -(1/G) sum_g A_g (1[j = i_g] - p_j) = -A_j / 3 (the advantages sum to 0)
    assert logits.grad.tolist()[0] == pytest.approx([-2 / 9, 1 / 9, 1 / 9], abs=1e-6)
    with torch.no_grad():  # a gradient step raises the log-probability of item 0
        stepped = logits - 0.5 * logits.grad
    assert torch.log_softmax(stepped, -1)[0, 0] > torch.log_softmax(logits.detach(), -1)[0, 0]

    _, adv = pg_loss(plackett_luce_log_prob(logits, lists), rewards)
    assert adv.tolist()[0] == pytest.approx([2 / 3 / (3 ** -0.5 + 1e-4), -1 / 3 / (3 ** -0.5 + 1e-4),
                                             -1 / 3 / (3 ** -0.5 + 1e-4)], abs=1e-5)  # std of (1, 0, 0): 1/sqrt 3
    _, adv = pg_loss(plackett_luce_log_prob(logits, lists), torch.ones(1, 3))
    assert float(adv.abs().max()) == 0.0  # equal rewards: no signal
    kl = torch.tensor([0.2])
    with_kl, _ = pg_loss(plackett_luce_log_prob(logits, lists), rewards, kl, kl_coef=0.5, scale_rewards=False)
    assert float(with_kl - loss) == pytest.approx(0.1)


# ---- a tiny generative recommender on 60 users of Amazon Beauty -----------------------------------------------

TINY = {"use_text": True, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_len": 20, "emb_dropout": 0.0,
        "hidden_dropout": 0.0, "lr": 1e-2, "batch_size": 32, "max_epochs": 5, "warmup_steps": 2, "progress": False,
        "quiet": True, "max_minutes": None, "text_cache_dir": None, "refit_with_valid": False}


@pytest.fixture(scope="module")
def beauty(tmp_path_factory):
    """The first 60 users of Amazon Beauty (5-core), the catalog cut to the items they touched."""
    return beauty_first_users(tmp_path_factory, 60)


@pytest.fixture(scope="module")
def generative(beauty):
    """Fitted in a second; random item-text vectors stand in for MiniLM (the text path runs, no download)."""
    import dragonrec.recommenders.sequential as seq
    from dragonrec.recommenders.sequential import GenerativeRecommender, SequentialConfig

    ds, split = beauty
    text = np.random.default_rng(0).normal(size=(len(ds.catalog), 384)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seq, "item_text_embeddings", lambda catalog, cache_dir=None: text)
        return GenerativeRecommender(SequentialConfig(**TINY)).fit(split.train, ds.catalog)


def feedback_log(rec, split, ranks=(0, 1), chosen_rank=15):
    """One impression per user after their training events: the model's top items (by `ranks`) and the item it
    ranks `chosen_rank`-th; the user scrolls past the first, ignores the second, clicks and buys the third.
    Returns (rewarded slots, the events log) as the store would export them."""
    train = split.train
    catalog_ids = np.asarray(rec.catalog.item_ids)
    impressions, rows = [], []
    for u, g in train.groupby("user_id", sort=False):
        hist, acts = g["item_idx"].to_numpy(), g["action"].astype(str).to_numpy()
        scores = rec.score([hist], [acts])[0]
        scores[hist] = -np.inf
        order = np.argsort(-scores, kind="stable")
        shown = [catalog_ids[order[r]] for r in ranks] + [catalog_ids[order[chosen_rank]]]
        ts = float(g["timestamp"].max()) + 100.0
        rid = f"r-{u}"
        impressions.append(Impression(request_id=rid, user_id=str(u), item_ids=shown, timestamp=ts))
        rows += [(u, shown[0], "scroll_past", ts + 5, rid), (u, shown[-1], "click", ts + 10, rid),
                 (u, shown[-1], "purchase", ts + 20, rid)]
    base = train[["user_id", "item_id", "action", "timestamp"]].assign(request_id=None)
    log = pd.concat([base, pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp", "request_id"])],
                    ignore_index=True)
    cfg = RewardConfig()
    return rewards(attribute(impressions, log, cfg), cfg), log


@pytest.fixture(scope="module")
def beauty_records(generative, beauty):
    _, split = beauty
    rewarded, log = feedback_log(generative, split)
    return to_records(build_pairs(rewarded, log)), to_records(build_groups(rewarded, log))


def test_item_logits_are_score_with_gradients(generative, pretrained, beauty, chain):
    for rec, split in ((generative, beauty[1]), (pretrained, chain[1])):
        hist, acts = split.test.histories[:5], split.test.actions[:5]
        logits = rec.item_logits(hist, acts)
        assert logits.shape == (5, len(rec.catalog)) and logits.requires_grad
        np.testing.assert_allclose(logits.detach().numpy(), rec.score(hist, acts), rtol=1e-4, atol=1e-4)
        torch.log_softmax(logits, -1)[:, int(split.test.targets[0])].sum().backward()
        grads = [p.grad for p in trainable_parameters(rec) if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
        rec.model.zero_grad(set_to_none=True)


def test_frozen_reference_is_a_copy_that_does_not_move(generative):
    policy = copy.deepcopy(generative)
    ref = frozen_reference(policy)
    assert ref.model is not policy.model and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)
    h = [np.array([0, 1, 2])]
    assert torch.equal(ref.item_logits(h), generative.item_logits(h).detach())  # still the weights at the copy
    assert not torch.equal(ref.item_logits(h), policy.item_logits(h).detach())


def test_preference_records_become_catalog_indices(generative, beauty_records):
    pairs, groups = beauty_records
    assert len(pairs) == 2 * len(groups) and {len(g["rejected"]) for g in groups} == {2}
    data = preference_data(generative, pairs)
    assert len(data) == len(pairs) and data.rejected.shape == (len(pairs), 1) and data.dropped == 0
    ids = np.asarray(generative.catalog.item_ids)
    assert ids[data.chosen[0]] == pairs[0]["chosen"] and list(ids[data.histories[0]]) == pairs[0]["history"]
    broken = [{**pairs[0], "chosen": "not-an-item"}, {**pairs[1], "rejected": ["nope", pairs[1]["rejected"]]}]
    data = preference_data(generative, broken)
    assert data.dropped == 1 and data.rejected.tolist() == [[generative.catalog.index_of(pairs[1]["rejected"])]]
    histories, actions = contexts_from_records(pairs, generative.catalog)
    assert len(histories) == len(groups) and all(len(h) == len(a) for h, a in zip(histories, actions))


def test_one_dpo_step_moves_the_log_ratio_margin_the_right_way(generative, beauty_records):
    pairs, _ = beauty_records
    policy = copy.deepcopy(generative)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    res = train_dpo(policy, pairs, DPOConfig(lr=1e-3, batch_size=len(pairs), max_steps=1, quiet=True))
    assert res.steps == 1 and res.epoch_loss[0] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    # margin_after - margin_before is the DPO log-ratio margin (pi_c - ref_c) - (pi_r - ref_r) after the step
    assert res.margin_after > res.margin_before and res.kl_after > 0
    assert any(not torch.equal(before[n], p) for n, p in policy.model.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in generative.model.named_parameters())  # the original untouched


def test_dpo_flips_the_preference_on_a_tiny_generative_model(generative, beauty_records, capsys):
    pairs, _ = beauty_records
    policy = copy.deepcopy(generative)
    res = train_dpo(policy, pairs, DPOConfig(lr=3e-3, beta=0.5, batch_size=16, epochs=8))
    assert res.accuracy_before == 0.0 and res.margin_before < 0  # the model ranked the rejected items higher
    assert res.accuracy_after >= 0.9 and res.margin_after > 0, res
    assert res.epoch_loss[-1] < 0.5 * res.epoch_loss[0] and res.kl_after > 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " dpo epoch " in ln]
    assert len(lines) == 8 and "loss" in lines[0] and "reward_margin" in lines[0]
    scores = policy.score([policy.catalog.indices(pairs[0]["history"])], [np.asarray(pairs[0]["history_actions"])])[0]
    c, r = policy.catalog.index_of(pairs[0]["chosen"]), policy.catalog.index_of(pairs[0]["rejected"])
    assert scores[c] > scores[r]  # score(), which serving uses, sees the change


def test_sdpo_flips_the_preference_on_a_tiny_generative_model(generative, beauty_records):
    _, groups = beauty_records
    policy = copy.deepcopy(generative)
    res = train_sdpo(policy, groups, SDPOConfig(lr=3e-3, beta=0.5, batch_size=16, epochs=8, quiet=True))
    assert res.examples == len(groups) and res.accuracy_before == 0.0
    assert res.accuracy_after >= 0.9 and res.margin_after > 0 and res.kl_after > 0, res
    assert res.epoch_loss[-1] < 0.5 * res.epoch_loss[0]
    one = train_sdpo(copy.deepcopy(generative), groups, SDPOConfig(max_negatives=1, max_steps=1, quiet=True))
    assert one.epoch_loss[0] == pytest.approx(math.log(2), abs=1e-5)  # one negative: DPO's log 2 at the start


def reward_table(records, catalog):
    """reward_fn of the feedback: +1 for a list holding the context's bought item, -1 per scrolled-past item."""
    table = {}
    for r in records:
        key = tuple(catalog.indices(r["history"]).tolist())
        good, bad = table.setdefault(key, (set(), set()))
        good.add(catalog.index_of(r["chosen"]))
        bad.update(catalog.indices(r["rejected"] if isinstance(r["rejected"], list) else [r["rejected"]]).tolist())

    def reward_fn(histories, actions, lists):
        out = np.zeros(lists.shape)
        for b, h in enumerate(histories):
            good, bad = table[tuple(np.asarray(h).tolist())]
            out[b] = [1.0 if i in good else -1.0 if i in bad else 0.0 for i in lists[b]]
        return out

    return reward_fn


def test_policy_gradient_raises_the_rewarded_item_on_a_tiny_generative_model(generative, beauty_records):
    _, groups = beauty_records
    policy = copy.deepcopy(generative)
    contexts = contexts_from_records(groups, policy.catalog)
    reward_fn = reward_table(groups, policy.catalog)
    data = preference_data(policy, groups)
    res = train_pg(policy, contexts, reward_fn, PGConfig(lr=1e-3, n=5, group_size=8, batch_size=16, epochs=10,
                                                         kl_coef=0.01, quiet=True))
    assert res.reward_before == -2.0  # every top-5 list holds both scrolled-past items and not the bought one
    assert res.reward_after > 0 and res.kl_after > 0, res  # measured: 0.55
    assert res.history[-1]["reward"] > res.history[0]["reward"]
    after = preference_data(policy, groups)
    c = torch.log_softmax(policy.item_logits(after.histories, after.actions).detach(), -1)
    c0 = torch.log_softmax(generative.item_logits(data.histories, data.actions).detach(), -1)
    rows = np.arange(len(data))
    margin = (c[rows, data.chosen] - c[rows, data.rejected[:, 0]]).numpy()
    margin0 = (c0[rows, data.chosen] - c0[rows, data.rejected[:, 0]]).numpy()
    assert (margin > margin0).mean() >= 0.9 and (margin > 0).mean() >= 0.7  # measured: 1.0 and 0.88


# ---- a tiny pretrained-lm recommender (LoRA on a small random Qwen2, chain data) -----------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    chain_items().to_parquet(d / "items.parquet")
    chain_events().to_parquet(d / "interactions.parquet")
    ds = load_dataset(d)
    return ds, leave_one_out(ds.events)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, chain):
    from test_pretrained import build_base_model

    from dragonrec.recommenders.pretrained import PretrainedLMRecommender

    ds, split = chain
    base = build_base_model(tmp_path_factory.mktemp("qwen"), "qwen2")
    model = PretrainedLMRecommender(base_model_path=str(base), epochs=2, batch_size=16, lr=3e-3, token_lr=2e-2,
                                    warmup_steps=2, num_threads=1, quiet=True)
    return model.fit(split.train, ds.catalog)


@pytest.fixture(scope="module")
def chain_records(pretrained, chain):
    """Per test context: the item the model ranks 6th is chosen over its top two (history excluded)."""
    ds, split = chain
    ids = np.asarray(ds.catalog.item_ids)
    hist, acts = split.test.histories[:24], split.test.actions[:24]
    scores = pretrained.score(hist, acts)
    records = []
    for b, (h, a) in enumerate(zip(hist, acts)):
        s = scores[b].copy()
        s[h] = -np.inf
        order = np.argsort(-s, kind="stable")
        records.append({"user_id": f"u{b}", "history": ids[h].tolist(), "history_actions": list(a),
                        "chosen": ids[order[5]], "rejected": [ids[order[0]], ids[order[1]]],
                        "margin": [1.0, 1.0], "weight": [1.0, 1.0]})
    return records


def test_dpo_sdpo_and_pg_on_a_tiny_pretrained_lm(pretrained, chain_records, tmp_path):
    from dragonrec.recommenders.pretrained import PretrainedLMRecommender

    res = train_dpo(copy.deepcopy(pretrained), chain_records,
                    DPOConfig(lr=1e-2, beta=0.5, batch_size=8, epochs=4, quiet=True))
    assert res.accuracy_before == 0.0 and res.accuracy_after >= 0.9 and res.margin_after > 0, res

    # the saved adapter, loaded for inference (frozen), trains too: its LoRA and token rows are unfrozen
    pretrained.save(tmp_path / "saved")
    loaded = PretrainedLMRecommender.load(tmp_path / "saved", pretrained.catalog)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    res = train_sdpo(loaded, chain_records, SDPOConfig(lr=1e-2, beta=0.5, batch_size=8, epochs=4, quiet=True))
    assert res.accuracy_before == 0.0 and res.accuracy_after >= 0.9 and res.kl_after > 0, res
    trained = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "trainable_tokens" in n for n in trained)

    policy = copy.deepcopy(pretrained)
    res = train_pg(policy, contexts_from_records(chain_records, policy.catalog),
                   reward_table(chain_records, policy.catalog),
                   PGConfig(lr=1e-2, n=3, group_size=8, batch_size=8, epochs=4, kl_coef=0.01, quiet=True))
    assert res.reward_before < 0 and res.reward_after > res.reward_before + 0.5, res
