"""The generative recommender grown from any pretrained Hugging Face causal LM: product tokens + LoRA.

What `PretrainedLMRecommender.fit` does to the base model (a local directory, e.g. Qwen2.5-0.5B):
1. adds one token `<item_k>` per product seen in training (k = `ItemVocab` model id: random order, training
   items only) and resizes the embeddings; each new token starts at the mean embedding of its title's tokens
   (input and, when untied, output embeddings), so it begins near what the model already knows of the product;
2. writes each user's history as a narrative in which every product is its TITLE followed by its token
   (never the raw id, see `dragonrec.model.narrative`):
       User viewed "Rose Hand Cream" <item_41>, purchased "Lip Balm" <item_7>. Recommend: <item_12>
3. fine-tunes LoRA adapters (peft, all linear layers) plus the rows of the new tokens (peft
   `trainable_token_indices`, tied to the output layer when the model ties its embeddings), with a softmax
   over product tokens at the position after "Recommend:";
4. scores a history by the logits of all product tokens at that position: a full ranking in one forward pass.
   `generate` gives the same model's constrained beam/greedy lists (`dragonrec.model.decode`).

Point it at a real model (download it on a machine with network access, copy the directory here):

    huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir models/qwen2.5-0.5b
    HF_HUB_OFFLINE=1 python -m dragonrec.model.pretrained models/qwen2.5-0.5b /work/shared/data/amazon-beauty \
        runs/qwen-beauty --epochs 1 --max-users 2000

See docs/pretrained.md for the settings and what to expect on a CPU and on a GPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.data.catalog import Catalog
from dragonrec.data.vocab import ItemVocab
from dragonrec.model.decode import generate_items, left_pad, score_next_items
from dragonrec.model.narrative import ItemNames, Narrative, to_text
from dragonrec.recommenders.base import Recommender, _exclusions, check_train_events


class PretrainedConfig(BaseModel):
    """Where the base model is and how to fine-tune it. Defaults run a tiny model on a laptop CPU."""

    model_config = ConfigDict(extra="forbid")

    base_model_path: str  # local directory of a HF causal LM + tokenizer (save_pretrained layout)
    lora_r: int = Field(8, ge=1)  # LoRA rank
    lora_alpha: int = Field(16, ge=1)  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA input
    target_modules: list[str] | str = "all-linear"  # modules given LoRA adapters (peft syntax)
    max_history: int = Field(20, ge=1)  # most recent events written into a narrative
    max_title_chars: int = Field(60, ge=8)  # product titles are cut to this many characters in prompts
    max_examples_per_user: int | None = Field(None, ge=1)  # newest next-item targets per user (None = all)
    epochs: int = Field(1, ge=1)  # passes over the training examples
    batch_size: int = Field(16, ge=1)  # narratives per optimiser step
    lr: float = Field(2e-4, gt=0)  # AdamW learning rate of the LoRA weights
    token_lr: float = Field(1e-3, gt=0)  # AdamW learning rate of the new product-token rows
    warmup_steps: int = Field(20, ge=0)  # linear learning-rate warm-up
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm (None = off)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype when loading the base model
    score_batch_size: int = Field(32, ge=1)  # histories per forward pass when scoring
    vocab_seed: int = 0  # seed of the random model-id order of products
    seed: int = 0  # shuffling and LoRA initialisation
    cpu: bool = False  # force CPU even when CUDA is present
    max_minutes: float | None = Field(None, gt=0)  # stop training after this long (None = run all epochs)


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).split(".")[-1]


def _user_sequences(events: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    users = events["user_id"].to_numpy()
    if len(users) > 1 and not (users[1:] >= users[:-1]).all():
        raise ValueError("events must be sorted by user_id, then time (as the readers return them)")
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    items = np.split(events["item_idx"].to_numpy(dtype=np.int64), cuts)
    acts = np.split(events["action"].astype(str).to_numpy(dtype=object), cuts)
    return [(i, a) for i, a in zip(items, acts) if len(i)]


def add_product_tokens(model, tokenizer, n_items: int) -> np.ndarray:
    """Add `<item_0>` .. `<item_{n-1}>` to a fast tokenizer as whole tokens and grow the model's embeddings to
    hold them (never shrinking a matrix padded past the tokenizer, as Qwen's is). Returns their token ids
    [n_items]: position k is model id k."""
    from tokenizers import AddedToken

    tokens = [f"<item_{k}>" for k in range(n_items)]
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
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
    out = None if _tied(model) else model.get_output_embeddings().weight
    enc = tokenizer(list(titles), add_special_tokens=False)["input_ids"]
    fallback = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for tok, title_ids in zip(np.asarray(token_ids).tolist(), enc):
            idx = torch.as_tensor(title_ids or [fallback], dtype=torch.long)
            inp[tok] = inp[idx].mean(0)
            if out is not None:
                out[tok] = out[idx].mean(0)


class PretrainedLMRecommender(Recommender):
    """Any HF causal LM + product tokens + LoRA, scored over product tokens after a title narrative."""

    name = "pretrained-lm"

    def __init__(self, cfg: PretrainedConfig | None = None, **overrides):
        if cfg is None:
            cfg = PretrainedConfig(**overrides)
        elif overrides:
            cfg = cfg.model_copy(update=overrides)
        self.cfg = cfg
        self.model = None  # peft.PeftModel after fit/load
        self.tokenizer = None
        self.vocab: ItemVocab | None = None
        self.names: ItemNames | None = None
        self.default_action = "purchase"
        self.history: list[dict] = []  # per-epoch training loss

    # ---- building ------------------------------------------------------------------------------------------

    def _load_base(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(self.cfg.base_model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json); download the "
                                    "model elsewhere and copy its directory here (see docs/pretrained.md)")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: a fast (tokenizers-backed) tokenizer is needed to add product tokens")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, self.cfg.dtype))
        return model, tokenizer

    def _wrap_lora(self, model, token_ids: np.ndarray):
        from peft import LoraConfig, get_peft_model

        ids = token_ids.tolist()
        if _tied(model):
            trainable = ids  # peft ties the output layer's rows to these
        else:
            trainable = {_module_name(model, model.get_input_embeddings()): ids,
                         _module_name(model, model.get_output_embeddings()): ids}
        lora = LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                          target_modules=self.cfg.target_modules, trainable_token_indices=trainable,
                          task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    # ---- narratives ----------------------------------------------------------------------------------------

    def _token(self, catalog_idx: int) -> str | None:
        k = int(self.vocab.model_id[catalog_idx])
        return f"<item_{k}>" if k >= 0 else None

    def prompt_text(self, history: np.ndarray, actions: Sequence[str] | None = None) -> str:
        """The narrative of a history, ending where the recommended product token goes."""
        history = np.asarray(history, dtype=np.int64)[-self.cfg.max_history:]
        if actions is None:
            actions = [self.default_action] * len(history)
        else:
            actions = list(actions)[len(actions) - len(history):]
        # the trailing space is where a full narrative's tokenizer puts it before "<item_k>"
        return to_text(Narrative(history, actions, recommend=[]), self.names, item_token=self._token) + " "

    def _encode(self, histories, actions) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.prompt_text(h, None if actions is None else actions[b]) for b, h in enumerate(histories)]
        ids = self.tokenizer(texts)["input_ids"]
        return left_pad(ids, pad_id=self.tokenizer.pad_token_id)

    # ---- the Recommender contract --------------------------------------------------------------------------

    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        from accelerate import Accelerator

        check_train_events(train)
        t_start = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        self.catalog = catalog
        self.names = ItemNames(catalog, max_chars=self.cfg.max_title_chars)
        self.vocab = ItemVocab.from_train(train["item_idx"].to_numpy(), len(catalog), seed=self.cfg.vocab_seed)
        self.default_action = str(train["action"].astype(str).mode().iloc[0])
        model, self.tokenizer = self._load_base()
        token_ids = add_product_tokens(model, self.tokenizer, len(self.vocab))
        init_from_titles(model, self.tokenizer, token_ids, [self.names.name(i) for i in self.vocab.catalog_index])
        self.item_token_ids = token_ids
        self.model = self._wrap_lora(model, token_ids)

        examples: list[tuple[np.ndarray, np.ndarray, int]] = []  # (history, actions, target model id)
        for items, acts in _user_sequences(train):
            starts = range(1, len(items))
            if self.cfg.max_examples_per_user is not None:
                starts = starts[-self.cfg.max_examples_per_user:]
            for t in starts:
                lo = max(0, t - self.cfg.max_history)
                examples.append((items[lo:t], acts[lo:t], int(self.vocab.model_id[items[t]])))
        if not examples:
            raise ValueError("no user has two training events: nothing to learn the next item from")
        prompts = self.tokenizer([self.prompt_text(h, a) for h, a, _ in examples])["input_ids"]
        targets = np.asarray([k for _, _, k in examples], dtype=np.int64)

        acc = Accelerator(cpu=self.cfg.cpu)
        token_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
        lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "trainable_tokens" not in n]
        opt = torch.optim.AdamW([{"params": lora_params, "lr": self.cfg.lr},
                                 {"params": token_params, "lr": self.cfg.token_lr}], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(self.cfg.warmup_steps, 1)))
        wrapped, opt = acc.prepare(self.model, opt)
        item_ids_dev = torch.as_tensor(token_ids, device=acc.device)
        rng = np.random.default_rng(self.cfg.seed)
        self.history = []
        for epoch in range(1, self.cfg.epochs + 1):
            wrapped.train()
            order = rng.permutation(len(prompts))
            batches = [order[s:s + self.cfg.batch_size] for s in range(0, len(order), self.cfg.batch_size)]
            mine = batches[acc.process_index::acc.num_processes]
            if acc.num_processes > 1:  # equal step counts keep DDP ranks in step
                mine = mine[:len(batches) // acc.num_processes]
            total, steps = 0.0, 0
            for idx in mine:
                ids, mask = left_pad([prompts[i] for i in idx], pad_id=self.tokenizer.pad_token_id)
                ids, mask = ids.to(acc.device), mask.to(acc.device)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = wrapped(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
                item_logits = logits[:, -1, item_ids_dev].float()  # softmax over product tokens only
                loss = F.cross_entropy(item_logits, torch.as_tensor(targets[idx], device=acc.device))
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                if self.cfg.grad_clip:
                    acc.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
                opt.step()
                sched.step()
                total += float(loss.detach())
                steps += 1
            self.history.append({"epoch": epoch, "loss": total / max(steps, 1),
                                 "elapsed_s": time.perf_counter() - t_start})
            if self.cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * self.cfg.max_minutes:
                break
        self.model = acc.unwrap_model(wrapped)
        self.model.eval()
        return self

    def _check_fitted(self) -> None:
        if self.model is None:
            raise RuntimeError("PretrainedLMRecommender is not fitted: call fit() or load() first")

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, len(catalog)] logits of each product token after the history's narrative; -inf for catalog
        items without a token (never seen in training)."""
        self._check_fitted()
        out = np.full((len(histories), len(self.catalog)), -np.inf, dtype=np.float32)
        bs = self.cfg.score_batch_size
        for s in range(0, len(histories), bs):
            ids, mask = self._encode(histories[s:s + bs], None if actions is None else actions[s:s + bs])
            scores = score_next_items(self.model, ids, self.item_token_ids, attention_mask=mask, batch_size=bs)
            out[s:s + bs, self.vocab.catalog_index] = scores.numpy()
        return out

    def generate(self, history: np.ndarray, n: int = 10, exclude=None, exclude_history: bool = True,
                 actions: np.ndarray | None = None, num_beams: int = 1) -> list[int]:
        """n catalog indices by constrained decoding (greedy, or beam search with num_beams > 1): only real
        products, no repeats, no excluded item."""
        self._check_fitted()
        barred = _exclusions(history if exclude_history else (), exclude)
        barred_ids = self.vocab.encode(barred[barred >= 0]) if len(barred) else np.empty(0, dtype=np.int64)
        ids, mask = self._encode([np.asarray(history, dtype=np.int64)], None if actions is None else [actions])
        ks = generate_items(self.model, ids, self.item_token_ids, n=n, attention_mask=mask,
                            exclude=[barred_ids[barred_ids >= 0].tolist()], num_beams=num_beams,
                            pad_token_id=self.tokenizer.pad_token_id)[0]
        return self.vocab.catalog_index[ks].tolist()

    # ---- saving --------------------------------------------------------------------------------------------

    def save(self, path: Path, merged: bool = False) -> None:
        """adapter/ (LoRA + new token rows, small; loading needs the base model) or, with `merged`, model/ (a
        standalone HF model, safetensors); plus tokenizer/ and pretrained_lm.json."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if merged:
            import copy

            copy.deepcopy(self.model).merge_and_unload().save_pretrained(str(path / "model"))
        else:
            # the resized embedding matrices are not saved whole: the new rows live in the adapter
            self.model.save_pretrained(str(path / "adapter"), save_embedding_layers=False)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        meta = {"config": self.cfg.model_dump(), "vocab": self.vocab.to_dict(), "default_action": self.default_action,
                "item_token_ids": self.item_token_ids.tolist(), "history": self.history,
                "embedding_rows": int(self.model.get_input_embeddings().weight.shape[0])}
        (path / "pretrained_lm.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path, catalog: Catalog) -> Self:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "pretrained_lm.json").exists():
            raise FileNotFoundError(f"{path / 'pretrained_lm.json'} not found: not a saved PretrainedLMRecommender")
        meta = json.loads((path / "pretrained_lm.json").read_text())
        self = cls(PretrainedConfig(**meta["config"]))
        self.catalog = catalog
        self.vocab = ItemVocab.from_dict(meta["vocab"])
        if self.vocab.n_catalog != len(catalog):
            raise ValueError(f"{path} was trained on a catalog of {self.vocab.n_catalog} items, not {len(catalog)}")
        self.names = ItemNames(catalog, max_chars=self.cfg.max_title_chars)
        self.default_action = meta["default_action"]
        self.history = meta["history"]
        self.item_token_ids = np.asarray(meta["item_token_ids"], dtype=np.int64)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        self.tokenizer.padding_side = "left"
        dtype = getattr(torch, self.cfg.dtype)
        if (path / "model").exists():
            self.model = AutoModelForCausalLM.from_pretrained(str(path / "model"), dtype=dtype)
        else:
            from peft import PeftModel

            base, _ = self._load_base()
            if base.get_input_embeddings().weight.shape[0] != meta["embedding_rows"]:
                base.resize_token_embeddings(meta["embedding_rows"], mean_resizing=False)
            self.model = PeftModel.from_pretrained(base, str(path / "adapter"))
        self.model.eval()
        return self


def train_pretrained(base_model_path: str, data_dir: str, out_dir: str, epochs: int = 1,
                     max_users: int | None = None, batch_size: int = 16, max_history: int = 20,
                     dtype: str = "float32", merged: bool = False) -> dict:
    """Fit on a dataset's leave-one-out training split, report validation metrics, save to out_dir.

    `max_users` keeps a random subset of users (a quick first run); validation is on the same users.
    """
    from dragonrec.data import leave_one_out, load_dataset
    from dragonrec.evaluate.runner import evaluate_cases

    ds = load_dataset(data_dir)
    events = ds.events
    if max_users is not None:
        users = events["user_id"].drop_duplicates()
        keep = set(users.sample(n=min(max_users, len(users)), random_state=0))
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    split = leave_one_out(events)
    model = PretrainedLMRecommender(base_model_path=base_model_path, epochs=epochs, batch_size=batch_size,
                                    max_history=max_history, dtype=dtype)
    t0 = time.perf_counter()
    model.fit(split.train, ds.catalog)
    fit_s = time.perf_counter() - t0
    report = {"dataset": ds.name, "users": int(events["user_id"].nunique()), "fit_seconds": fit_s,
              "train_loss": model.history, "valid": evaluate_cases(model, split.valid, train=split.train)["metrics"]}
    model.save(Path(out_dir), merged=merged)
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


if __name__ == "__main__":
    import typer

    def main(base_model_path: str, data_dir: str, out_dir: str, epochs: int = 1, max_users: int = 0,
             batch_size: int = 16, max_history: int = 20, dtype: str = "float32", merged: bool = False) -> None:
        """Grow a recommender from a local pretrained causal LM; e.g.
        python -m dragonrec.model.pretrained models/qwen2.5-0.5b /work/shared/data/amazon-beauty runs/qwen"""
        report = train_pretrained(base_model_path, data_dir, out_dir, epochs, max_users or None, batch_size,
                                  max_history, dtype, merged)
        print(json.dumps({k: v for k, v in report.items() if k != "train_loss"}, indent=2, default=float))

    typer.run(main)
