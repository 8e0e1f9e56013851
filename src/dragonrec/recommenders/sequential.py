"""The sequence-model recommenders: `sasrec` (ID-only SASRec-style causal LM) and `generative` (+ item text).

    model = SequentialRecommender().fit(split.train, catalog, valid=split.valid)   # early stops on valid
    scores = model.score(histories)                                             # [B, len(catalog)]

Both train a small `SeqRecLM` (transformers Llama) with `dragonrec.model.trainer`. `generative` adds each
item's text embedding (all-MiniLM-L6-v2 via `dragonrec.embed`) to its token vector through a learned
projection, so catalog items never seen in training get a score and can be recommended.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from dragonrec.data.catalog import Catalog
from dragonrec.data.stats import interaction_density, suggest_dropout, suggest_max_len
from dragonrec.model.config import SeqRecConfig
from dragonrec.model.lm import ItemTokenizer, SeqRecLM, pad_batch
from dragonrec.model.trainer import SFTConfig, TrainResult, train_sft
from dragonrec.progress import log
from dragonrec.recommenders.base import Recommender, check_train_events


class SequentialConfig(SeqRecConfig, SFTConfig):
    """Every model field (`SeqRecConfig`) and training field (`SFTConfig`), flat, plus these."""

    # data-driven settings -> the fields they set: an override of such a field switches its rule off (`build`)
    AUTO_SETTINGS: ClassVar[dict[str, tuple[str, ...]]] = {"max_len_auto": ("max_len",),
                                                           "dropout_auto": ("emb_dropout", "hidden_dropout")}
    narrative_auto: bool = True  # turn on narrative mode when the training data has several action types
    # max_len from the data: the 95th percentile of training history lengths (events x tokens per event + [BOS],
    # `data.stats.suggest_max_len`, 16-256) instead of the fixed `max_len`
    max_len_auto: bool = False
    # dropout from the data (`data.stats.suggest_dropout`, SASRec's rule): training interactions at least
    # `dense_density` dense (distinct user-item pairs over users x items) train with `dense_dropout` on the
    # embeddings and hidden layers; sparser data keeps `emb_dropout` / `hidden_dropout`. A dropout given explicitly
    # (--set, a search's trial) switches this off (`recommenders.build`).
    dropout_auto: bool = False
    dense_density: float = Field(0.01, gt=0.0, le=1.0)
    dense_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    vocab_seed: int = 0  # seed of the random model-id order of items
    text_cache_dir: str | None = ".cache/embeddings"  # on-disk cache of item text embeddings (None = none)
    score_batch_size: int = 512  # histories per forward pass in score()
    # After early stopping on `valid`, train a fresh model on train + the validation targets for the best
    # epoch count (validation labels, never test ones; the chosen epochs come from the first run).
    refit_with_valid: bool = True

    def adapted_to(self, train: pd.DataFrame) -> tuple[SequentialConfig, list[str]]:
        """This configuration with its data-driven settings (`narrative_auto`, `max_len_auto`, `dropout_auto`)
        resolved on the training events, and a line on each of the last two that changed."""
        update, notes = {}, []
        narrative = self.narrative or (self.narrative_auto and train["action"].nunique() > 1)
        if narrative != self.narrative:  # several action types: action tokens in the narratives
            update["narrative"] = narrative
        if self.max_len_auto:
            update["max_len"] = suggest_max_len(train.groupby("user_id").size().to_numpy(),
                                                tokens_per_event=2 if narrative else 1)
            notes.append(f"max_len {update['max_len']} from the training history lengths (95th percentile)")
        if self.dropout_auto:
            density = interaction_density(train)
            emb = suggest_dropout(density, self.emb_dropout, self.dense_dropout, self.dense_density)
            hidden = suggest_dropout(density, self.hidden_dropout, self.dense_dropout, self.dense_density)
            if (emb, hidden) != (self.emb_dropout, self.hidden_dropout):
                update |= {"emb_dropout": emb, "hidden_dropout": hidden}
                notes.append(f"dropout {emb:g}/{hidden:g} for dense interactions ({100 * density:.2f} % of "
                             f"user-item pairs, at least {100 * self.dense_density:g} %)")
        return (self.model_copy(update=update) if update else self), notes

    def model_part(self) -> SeqRecConfig:
        return SeqRecConfig(**{k: getattr(self, k) for k in SeqRecConfig.model_fields})

    def train_part(self) -> SFTConfig:
        return SFTConfig(**{k: getattr(self, k) for k in SFTConfig.model_fields})


def item_text_embeddings(catalog: Catalog, cache_dir: str | None = None) -> np.ndarray:
    """[len(catalog), 384] float32 unit vectors of each item's text (title, brand, category, ...)."""
    from dragonrec.embed import embed_catalog

    return embed_catalog(catalog, cache_dir=cache_dir)


def uninformative_text(vectors: np.ndarray, min_distinct_share: float = 0.05) -> str | None:
    """Why a catalog's item text cannot help a model (None when it can): empty or repeated texts give few
    distinct vectors. Fewer distinct text vectors than `min_distinct_share` of the items is uninformative."""
    if not len(vectors):
        return "no items"
    distinct = len(np.unique(np.round(np.asarray(vectors, dtype=np.float32), 4), axis=0))
    if distinct < max(2, min_distinct_share * len(vectors)):
        return f"{distinct} distinct item texts among {len(vectors)} items"
    return None


def catalog_fingerprint(catalog: Catalog) -> str:
    """sha256 of the catalog's item ids in order: a saved model only fits the catalog it was trained on."""
    import hashlib

    return hashlib.sha256("\n".join(map(str, catalog.item_ids)).encode()).hexdigest()


def user_sequences(events: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """(catalog indices, action names) per user, in the events' order (readers sort by user, then time)."""
    users = events["user_id"].to_numpy()
    items = events["item_idx"].to_numpy(dtype=np.int64)
    acts = events["action"].astype(str).to_numpy(dtype=object)
    if len(users) > 1 and not (users[1:] >= users[:-1]).all():
        raise ValueError("events must be sorted by user_id, then time (as the readers return them)")
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    return [(i, a) for i, a in zip(np.split(items, cuts), np.split(acts, cuts)) if len(i)]


COLD_OFFSETS = tuple(np.round(np.arange(-8.0, 8.01, 0.25), 2))
"""Offsets of the cold head tried by `calibrate_cold` (log-prior of a cold item against trained ones)."""
OFF = -1e4  # an offset that keeps cold items out of every list: the reference `calibrate_cold` reports


class SequentialRecommender(Recommender):
    """SASRec-style next-item model: a causal LM over product tokens with full-softmax cross-entropy."""

    name = "sasrec"
    # config fields this variant changes. dropout_auto: dense interactions (ml-100k) train with dropout 0.2 instead
    # of 0.3, as SASRec's reference code does on MovieLens (validation NDCG@10 up on 3 of 3 ml-100k seeds,
    # docs/tuning.md "Dropout from the data")
    default_config: ClassVar[dict] = {"dropout_auto": True}

    def __init__(self, cfg: SequentialConfig | None = None):
        self.cfg = cfg or SequentialConfig(**self.default_config)
        self.model: SeqRecLM | None = None
        self.tokenizer: ItemTokenizer | None = None
        self.result: TrainResult | None = None
        self._merged = None  # the HF model generate() runs, built on first use
        self.provenance: dict | None = None  # what the data is (checkpoints record it; resume checks it)
        self.text_fallback: str | None = None  # why item text was ignored at fit time (None: used, or not asked)
        self.cold_calibration: dict | None = None  # what `calibrate_cold` chose at fit time (cold_head only)
        self.on_eval = None  # per-validation callback (epoch, ndcg) -> stop? for train_sft (dragonrec.tune)

    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        check_train_events(train)
        self.catalog = catalog
        cfg = self.cfg
        vectors = item_text_embeddings(catalog, cfg.text_cache_dir) if cfg.use_text else None
        self.text_fallback = uninformative_text(vectors) if vectors is not None else None
        if self.text_fallback:  # text that cannot tell items apart can only add noise: IDs alone
            log(None, f"{self.name}: item text ignored, IDs only ({self.text_fallback})", cfg.quiet)
            cfg = self.cfg = cfg.model_copy(update={"use_text": False, "cold_head": False})
        if not cfg.use_text and cfg.cold_head:  # text switched off (a search's choice): no text, no cold head
            cfg = self.cfg = cfg.model_copy(update={"cold_head": False})
        cfg, notes = cfg.adapted_to(train)
        self.cfg = cfg
        for note in notes:
            log(None, f"{self.name}: {note}", cfg.quiet)
        self.tokenizer = ItemTokenizer.from_train(train["item_idx"].to_numpy(), len(catalog), cfg.vocab_seed,
                                                  with_all_items=cfg.use_text)
        text = None
        if cfg.use_text:
            text = vectors[self.tokenizer.vocab.catalog_index]
        torch.manual_seed(cfg.seed)
        self.model = SeqRecLM(cfg.model_part(), self.tokenizer.n_items, self.tokenizer.n_trained, text_emb=text)
        self._merged = None
        self.result = train_sft(self.model, self.tokenizer, user_sequences(train), valid=valid, cfg=cfg.train_part(),
                                provenance=self.provenance, on_eval=self.on_eval)
        self.model.to("cpu").eval()
        self.cold_calibration = None
        if self.model.cold_proj is not None and valid is not None and len(valid):
            self.cold_calibration = self.calibrate_cold(valid)
            self.model.cold_offset.fill_(self.cold_calibration["offset"])
            log(None, f"{self.name}: cold-item offset {self.cold_calibration['offset']:+.2f} (validation NDCG@10 "
                f"{self.cold_calibration['ndcg@10']:.4f}, {self.cold_calibration['ndcg@10_off']:.4f} without cold items)",
                cfg.quiet)
        if cfg.refit_with_valid and valid is not None and len(valid):
            self.refit(train, catalog, valid)
        return self

    @torch.no_grad()
    def calibrate_cold(self, cases, offsets: Sequence[float] = COLD_OFFSETS, batch_size: int = 512) -> dict:
        """The cold head's offset that maximises NDCG@10 (history excluded, ties against the target) on `cases`
        (validation): the trained items the head never trained on (`cold_holdout`) stand in for cold items, scored
        by the head as new products will be, beside the main path's log-softmax over the other trained items."""
        m, tok = self.model, self.tokenizer
        narrative, max_len, n_head = m.cfg.narrative, m.cfg.max_len, m.n_head
        grid = torch.as_tensor([OFF, *offsets], dtype=torch.float32)
        dcg, hits = torch.zeros(len(grid), dtype=torch.float64), torch.zeros(len(grid), dtype=torch.float64)
        actions = cases.actions if narrative else [None] * len(cases)
        n_cold_targets = 0
        for s in range(0, len(cases), batch_size):
            hist = cases.histories[s:s + batch_size]
            toks = [tok.encode(np.asarray(h, dtype=np.int64), a, narrative=narrative, max_len=max_len)
                    for h, a in zip(hist, actions[s:s + batch_size])]
            main, text_lp = m.log_probs(*m.last_hidden(pad_batch(toks), with_query=True))
            scores = torch.cat([main[:, :n_head] - torch.logsumexp(main[:, :n_head], 1, keepdim=True),
                                text_lp[:, n_head:]], dim=1)  # [B, n_items]: warm log-probs, then cold ones
            rows = np.concatenate([np.full(len(h), b) for b, h in enumerate(hist)]).astype(np.int64)
            cols = tok.item_ids(np.concatenate(hist).astype(np.int64)) if len(rows) else rows
            scores[torch.as_tensor(rows[cols >= 0]), torch.as_tensor(cols[cols >= 0])] = -torch.inf
            tgt = torch.as_tensor(tok.item_ids(cases.targets[s:s + batch_size]))
            is_cold = tgt >= n_head
            n_cold_targets += int(is_cold.sum())
            t = scores.gather(1, tgt.clamp(min=0)[:, None]).masked_fill(tgt[:, None] < 0, -torch.inf)  # [B, 1]
            # the target's score at each offset [B, K], against the warm items and (offset removed) the cold ones;
            # its own side compares to its unshifted score, so that it always counts itself exactly once
            cold_t = is_cold[:, None]
            t_warm = torch.where(cold_t, t + grid[None, :], t).contiguous()
            t_cold = torch.where(cold_t, t, t - grid[None, :]).contiguous()
            warm = torch.sort(scores[:, :n_head], dim=1).values.contiguous()
            cold = torch.sort(scores[:, n_head:], dim=1).values.contiguous()
            rank = (warm.shape[1] - torch.searchsorted(warm, t_warm)
                    + cold.shape[1] - torch.searchsorted(cold, t_cold) - 1)
            hit = torch.isfinite(t) & (rank < 10)
            dcg += (hit / torch.log2(rank.double() + 2)).sum(0)
            hits += hit.sum(0)
        best = int(torch.argmax(dcg[1:])) + 1
        n = max(len(cases), 1)
        return {"offset": float(grid[best]), "ndcg@10": float(dcg[best] / n), "hr@10": float(hits[best] / n),
                "ndcg@10_off": float(dcg[0] / n), "hr@10_off": float(hits[0] / n), "cases": len(cases),
                "cold_target_cases": n_cold_targets, "stand_in_items": m.n_trained - n_head,
                "curve": {f"{float(c):.2f}": float(d / n) for c, d in zip(grid[1:], dcg[1:])}}

    def refit(self, train: pd.DataFrame, catalog: Catalog, valid) -> Self:
        """Replace the fitted model by a fresh one trained on train + the validation targets, for the epoch
        count early stopping chose on `valid` (what `refit_with_valid` does at the end of `fit`)."""
        self._check_fitted()
        # Stable sort on user only: each user's validation target lands after their training events.
        both = pd.concat([train, valid.as_events(catalog.item_ids)], ignore_index=True)
        both = both.sort_values("user_id", kind="stable").reset_index(drop=True)
        ckpt = self.cfg.checkpoint_dir and str(Path(self.cfg.checkpoint_dir) / "refit")
        # the cold head's offset was calibrated above: the refit trains its head on every item (no stand-ins)
        cfg2 = self.cfg.model_copy(update={"max_epochs": max(self.result.best_epoch, 1), "max_minutes": None,
                                           "refit_with_valid": False, "checkpoint_dir": ckpt, "cold_holdout": 0.0,
                                           "label": f"{self.cfg.label} refit"})
        first = self.result
        refit = type(self)(cfg2)
        refit.provenance = self.provenance
        refit.fit(both, catalog)
        if refit.model.cold_proj is not None and self.model.cold_ready:
            refit.model.cold_offset.copy_(self.model.cold_offset)
        self.model, self.tokenizer, self.result = refit.model, refit.tokenizer, refit.result
        self._merged = None
        self.result.history = [*first.history, *self.result.history]
        self.result.best_epoch, self.result.best_ndcg = first.best_epoch, first.best_ndcg
        return self

    def _check_fitted(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load() first")

    @property
    def scores_new_items(self) -> bool:
        """Whether products added to the catalog after training get a score (`score(..., new_text=...)`)."""
        return self.model is not None and self.model.cold_ready

    @torch.no_grad()
    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None,
              new_text: np.ndarray | None = None) -> np.ndarray:
        """[B, len(catalog)] scores (-inf for items without a token); with `new_text` [m, text_dim], the text
        vectors of m products added after training, m more columns that score them by the cold head (-inf
        without a calibrated one: `scores_new_items`). Histories hold catalog indices (< len(catalog))."""
        self._check_fitted()
        narrative, max_len = self.model.cfg.narrative, self.model.cfg.max_len
        if narrative and actions is None:
            actions = [np.full(len(h), "view", dtype=object) for h in histories]  # unknown actions: read as views
        device = next(self.model.parameters()).device
        n_new = 0 if new_text is None else len(new_text)
        extra = None if new_text is None else torch.as_tensor(np.asarray(new_text, dtype=np.float32), device=device)
        out = np.full((len(histories), len(self.catalog) + n_new), -np.inf, dtype=np.float32)
        cols = np.concatenate([self.tokenizer.vocab.catalog_index, len(self.catalog) + np.arange(n_new)])
        actions = list(actions) if actions is not None else [None] * len(histories)
        for s in range(0, len(histories), self.cfg.score_batch_size):
            toks = [self.tokenizer.encode(np.asarray(h, dtype=np.int64), None if actions is None else a,
                                          narrative=narrative, max_len=max_len)
                    for h, a in zip(histories[s:s + self.cfg.score_batch_size],
                                    actions[s:s + self.cfg.score_batch_size])]
            scores = self.model.score_items(pad_batch(toks).to(device), extra_text=extra).float().cpu().numpy()
            out[s:s + len(toks), cols] = scores
        return out

    def item_logits(self, histories: Sequence[np.ndarray],
                    actions: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """[B, len(catalog)] next-item logits as `score` computes them, on the model's device and with autograd
        (preference fine-tuning, `dragonrec.train`): -inf for items without a token. The model's mode (dropout
        on or off) is the caller's."""
        self._check_fitted()
        narrative, max_len = self.model.cfg.narrative, self.model.cfg.max_len
        if narrative and actions is None:
            actions = [np.full(len(h), "view", dtype=object) for h in histories]  # unknown actions: read as views
        actions = list(actions) if actions is not None else [None] * len(histories)
        toks = [self.tokenizer.encode(np.asarray(h, dtype=np.int64), a, narrative=narrative, max_len=max_len)
                for h, a in zip(histories, actions)]
        device = next(self.model.parameters()).device
        scores = self.model.score_items(pad_batch(toks).to(device)).float()
        if torch.is_grad_enabled():
            self._merged = None  # the weights are about to change: generate() rebuilds its merged copy
        cols = torch.as_tensor(self.tokenizer.vocab.catalog_index, device=device)
        return scores.new_full((len(toks), len(self.catalog)), -np.inf).index_copy(1, cols, scores)

    @torch.no_grad()
    def generate(self, history: np.ndarray, n: int = 10, actions: np.ndarray | None = None,
                 exclude=None, exclude_history: bool = True, num_beams: int = 1) -> list[int]:
        """A list of n catalog indices written token by token with constrained decoding: only real product
        tokens, no repeats, no excluded item (nor a history item, by default). Greedy, or beam search."""
        from dragonrec.model.decode import generate_items
        from dragonrec.model.lm import ITEM_OFFSET

        self._check_fitted()
        cfg = self.model.cfg
        history = np.asarray(history, dtype=np.int64)
        if cfg.narrative and actions is None:
            actions = np.full(len(history), "view", dtype=object)
        tokens = self.tokenizer.encode(history, actions, narrative=cfg.narrative, max_len=cfg.max_len)
        banned = np.concatenate([history if exclude_history else np.zeros(0, np.int64),
                                 np.asarray(list(exclude or []), dtype=np.int64)])
        banned_ids = self.tokenizer.item_ids(banned)
        if self._merged is None:  # generate() needs a plain HF model; the text projection is merged into it
            self._merged = self.model.merged_causal_lm().eval()
        item_tokens = ITEM_OFFSET + np.arange(self.tokenizer.n_items)
        positions = generate_items(self._merged, torch.tensor([tokens]), item_tokens, n,
                                   exclude=[np.unique(banned_ids[banned_ids >= 0])], num_beams=num_beams)[0]
        return self.tokenizer.vocab.catalog_index[np.asarray(positions, dtype=np.int64)].tolist()

    def save(self, path: Path) -> None:
        self._check_fitted()
        path = Path(path)
        self.model.save_pretrained(path, self.tokenizer)
        meta = {"name": self.name, "config": self.cfg.model_dump(), "n_catalog": len(self.catalog),
                "catalog_sha256": catalog_fingerprint(self.catalog),
                "train": self.result.to_dict() if self.result else None, "cold_calibration": self.cold_calibration}
        (path / "recommender.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path, catalog: Catalog) -> Self:
        path = Path(path)
        meta_file = path / "recommender.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file} not found: not a saved {cls.__name__}")
        meta = json.loads(meta_file.read_text())
        if meta["n_catalog"] != len(catalog):
            raise ValueError(f"the model was trained on a catalog of {meta['n_catalog']} items, "
                             f"this catalog has {len(catalog)}")
        if meta.get("catalog_sha256") not in (None, catalog_fingerprint(catalog)):
            raise ValueError(f"{path} was trained on another catalog (same size, different item ids or order): "
                             "its scores would name the wrong items")
        self = cls(SequentialConfig(**meta["config"]))
        self.catalog = catalog
        self.model = SeqRecLM.from_pretrained(path).eval()
        self.tokenizer = ItemTokenizer.load(path)
        self.cold_calibration = meta.get("cold_calibration")
        return self


class GenerativeRecommender(SequentialRecommender):
    """The same model with item text in every product token: scores items never seen in training."""

    name = "generative"
    # dropout 0.5 was best on Beauty validation with text (0.0683 vs 0.0672 at 0.3; benchmarks/results)
    # cold_head: products never interacted with (or added after training) are scored by text through a calibrated
    # head that never changes the trained items' ranking (docs/benchmarks.md, "Cold items")
    # dropout_auto: dense interactions (ml-100k) train with 0.2 instead (docs/tuning.md, "Dropout from the data")
    default_config: ClassVar[dict] = {"use_text": True, "emb_dropout": 0.5, "hidden_dropout": 0.5, "cold_head": True,
                                      "dropout_auto": True}
