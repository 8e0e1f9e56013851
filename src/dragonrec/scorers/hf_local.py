"""A scorer backed by a local Hugging Face causal LM: a candidate's score is the mean log-likelihood of its
text given a prompt with the shopper's history (length-normalised, so long titles are not penalised).

    scorer = HFLocalScorer(HFScorerConfig(model_dir="models/qwen2.5-0.5b-instruct"))
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from dragonrec.scorers.base import Scorer, ScoreRequest, ScoreResult, Usage


class HFScorerConfig(BaseModel):
    """Which local model scores, and how the prompt is built."""

    model_config = ConfigDict(frozen=True)

    model_dir: str
    """A folder with a causal LM and its tokenizer (save_pretrained output); nothing is downloaded."""
    prompt: str = "A shopper's recent activity:\n{history}\n{preferences}The product they will want next: "
    """Prompt template; {history} is one line per event, {preferences} a line or ''."""
    max_history: int = 10
    """Latest history events in the prompt."""
    max_item_chars: int = 200
    """Item texts are cut to this length."""
    batch_size: int = 16
    """Candidates per forward pass."""
    max_length: int = 1024
    """Longest prompt + candidate in tokens; the prompt is cut from the left to fit."""
    device: str = "cpu"
    """torch device."""


class HFLocalScorer(Scorer):
    """Mean log p(candidate text | prompt) under a local causal LM."""

    def __init__(self, cfg: HFScorerConfig):
        if not Path(cfg.model_dir).is_dir():
            raise FileNotFoundError(f"{cfg.model_dir}: no such model folder")
        self.cfg = cfg
        self.name = f"hf:{Path(cfg.model_dir).name}"
        self._model = None
        self._tok = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.cfg.model_dir, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(self.cfg.model_dir, local_files_only=True)
            self._model.to(self.cfg.device).eval()
        return self._model, self._tok

    def prompt(self, request: ScoreRequest) -> str:
        cut = self.cfg.max_item_chars
        hist = request.history[-self.cfg.max_history:] if self.cfg.max_history else []
        lines = "\n".join(f"- {h.action or 'interacted'}: {h.text[:cut]}" for h in hist) or "- (nothing yet)"
        prefs = request.preferences
        pref_line = ""
        if prefs is not None and not prefs.is_empty():
            pref_line = f"They said they like: {'; '.join(prefs.texts())}\n"
        return self.cfg.prompt.format(history=lines, preferences=pref_line)

    def score(self, request: ScoreRequest) -> ScoreResult:
        n = len(request.candidates)
        t0 = time.perf_counter()
        try:
            scores = self._loglik(self.prompt(request), [c.text[: self.cfg.max_item_chars] for c in request.candidates])
        except Exception as e:  # noqa: BLE001 - an OOM or a broken model must not take the request down
            return ScoreResult.fallback(n, f"{self.name} failed: {type(e).__name__}: {e}")
        usage = Usage(requests=1, latency_s=time.perf_counter() - t0)
        return ScoreResult(scores, ["likely next, given the history"] * n, usage=usage)

    def _loglik(self, prompt: str, texts: list[str]) -> np.ndarray:
        import torch

        model, tok = self._load()
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        out = np.full(len(texts), np.nan, dtype=np.float32)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for s in range(0, len(texts), self.cfg.batch_size):
            chunk = texts[s:s + self.cfg.batch_size]
            seqs, starts = [], []
            for text in chunk:
                c_ids = tok(text, add_special_tokens=False)["input_ids"] or [pad]
                c_ids = c_ids[: self.cfg.max_length - 1]
                keep = self.cfg.max_length - len(c_ids)
                prefix = p_ids[-keep:] if keep > 0 else []
                prefix = prefix or [tok.bos_token_id if tok.bos_token_id is not None else pad]
                seqs.append(prefix + c_ids)
                starts.append(len(prefix))
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for b, seq in enumerate(seqs):
                ids[b, :len(seq)] = torch.tensor(seq)
                mask[b, :len(seq)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(self.cfg.device), attention_mask=mask.to(self.cfg.device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_lp = logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0].cpu()
            for b, (seq, start) in enumerate(zip(seqs, starts)):
                # token t (t >= start) is predicted at position t-1
                out[s + b] = float(token_lp[b, start - 1: len(seq) - 1].mean())
        return out

    def close(self) -> None:
        self._model = None
        self._tok = None
