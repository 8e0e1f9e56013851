"""Supervised next-item training of `SeqRecLM` (SASRec-style: every prefix of every sequence is a sample).

    result = train_sft(model, tokenizer, sequences, valid=valid_cases, cfg=SFTConfig(max_epochs=100))

`sequences` are per-user (catalog indices, action names) in time order. Batches are bucketed by length
(sorted within shuffled chunks) so little padding is computed; one forward pass trains every prefix. Early
stopping watches validation NDCG@10 (history items excluded, full ranking, one matmul per batch). Runs on
CUDA when present, on CPU otherwise, and unchanged under `accelerate launch` (each process takes its share of
the batches; each evaluates the full validation set, so all stop together). With `checkpoint_dir` the run
saves `last/` (accelerate state: resumes) and `best/` (a loadable `SeqRecLM` + tokenizer).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.data.provenance import PROVENANCE, ProvenanceError
from dragonrec.model.lm import IGNORE, ItemTokenizer, SeqRecLM, pad_batch
from dragonrec.registry import fsync_path
from dragonrec.schema import positive_mask

RESUME_KEYS = ("dataset_sha256", "split", "ties", "seed")


class SFTConfig(BaseModel):
    """Optimisation and early stopping. Defaults suit the ID-only model on Amazon Beauty on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(2e-3, gt=0)  # AdamW peak learning rate
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay
    batch_size: int = Field(128, ge=1)  # sequences per step
    max_epochs: int = Field(200, ge=1)  # passes over the training sequences
    patience: int = Field(5, ge=1)  # evaluations without a better validation NDCG@10 before stopping
    eval_every: int = Field(2, ge=1)  # epochs between validation runs
    max_minutes: float | None = Field(20.0, gt=0)  # wall-clock budget for training (None = unlimited)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy label smoothing
    warmup_steps: int = Field(100, ge=0)  # linear learning-rate warm-up
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm (None = off)
    bucket_chunk: int = Field(64, ge=1)  # batches per length-sorted chunk (bigger = less padding, less random)
    eval_batch_size: int = Field(1024, ge=1)  # validation histories per matmul
    seed: int = 0  # shuffling and initialisation
    cpu: bool = False  # force CPU even when CUDA is present
    checkpoint_dir: str | None = None  # where last/ and best/ go (None = keep the best weights in memory only)
    resume: bool = True  # continue from checkpoint_dir/last when it exists
    progress: bool = True  # a live bar on a terminal (plain per-epoch log lines are written when not one)
    quiet: bool = False  # no bar and no log lines
    label: str = "sft"  # how log lines name this run ("sft", "sft refit", ...)


@dataclass
class TrainResult:
    """What a run did: per-evaluation history and where the time went."""

    best_epoch: int = 0
    best_ndcg: float = -1.0
    epochs: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # prep, train, eval, total
    samples: int = 0  # next-item targets trained on (all epochs)
    seconds_to_best: float = 0.0
    stopped: str = ""  # "patience", "max_epochs", "time" or "callback"

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds.get("train", 0.0), 1e-9)

    def to_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_valid_ndcg@10": self.best_ndcg, "epochs": self.epochs,
                "stopped": self.stopped, "seconds": self.seconds, "seconds_to_best": self.seconds_to_best,
                "samples": self.samples, "samples_per_s": self.samples_per_s, "history": self.history}


def encode_sequences(tokenizer: ItemTokenizer, sequences: Sequence[tuple[np.ndarray, np.ndarray | None]],
                     max_len: int, narrative: bool = False) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) windows of at most `max_len` tokens covering each whole training sequence.

    A sequence longer than one window is cut into windows from the newest item back, overlapping by one
    item, so every item is a target exactly once: a later window's [BOS] gets no target (it has no context).
    """
    per = max_len - 1 if not narrative else (max_len - 1) // 2  # events per window
    out = []
    for items, actions in sequences:
        ids = tokenizer.item_ids(items)
        keep = ids >= 0
        items = np.asarray(items)[keep]
        acts = None if actions is None else np.asarray(actions, dtype=object)[keep]
        if acts is not None and not narrative:  # without action tokens only positive events are written
            pos = positive_mask(acts)
            items, acts = items[pos], acts[pos]
        if len(items) < (2 if narrative else 1):
            continue
        positive = None if acts is None else positive_mask(acts)
        end = len(items)
        while True:
            start = max(0, end - per)
            toks = tokenizer.encode(items[start:end], None if acts is None else acts[start:end], narrative=narrative)
            labels = tokenizer.target_labels(toks, narrative=narrative,
                                             positive=None if positive is None else positive[start:end])
            if start > 0:
                labels[0] = IGNORE
            if any(lab != IGNORE for lab in labels):
                out.append((toks, labels))
            if start == 0:
                break
            end = start + 1  # the earlier window ends on this window's first item, which it then predicts
    return out


def _batches(lengths: np.ndarray, batch_size: int, chunk: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches: shuffle, sort by length inside chunks of `chunk` batches, then shuffle the batches."""
    order = rng.permutation(len(lengths))
    size = batch_size * chunk
    batches = []
    for s in range(0, len(order), size):
        part = order[s:s + size]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class ValidationSet:
    """Validation cases encoded once: token batches sorted by length, targets and history as model ids."""

    def __init__(self, tokenizer: ItemTokenizer, histories, actions, targets, max_len: int, narrative: bool,
                 batch_size: int):
        toks = [tokenizer.encode(h, a, narrative=narrative, max_len=max_len) for h, a in zip(histories, actions)]
        order = np.argsort([len(t) for t in toks], kind="stable")
        tgt = tokenizer.item_ids(np.asarray(targets))
        self.batches = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            hist = [tokenizer.item_ids(histories[i]) for i in idx]
            rows = np.concatenate([np.full(len(h), b) for b, h in enumerate(hist)]).astype(np.int64)
            cols = np.concatenate(hist).astype(np.int64)
            ok = cols >= 0
            self.batches.append((pad_batch([toks[i] for i in idx]), torch.as_tensor(tgt[idx]),
                                 torch.as_tensor(rows[ok]), torch.as_tensor(cols[ok])))
        self.n = len(order)

    @torch.no_grad()
    def evaluate(self, model: SeqRecLM, device, k: int = 10) -> dict[str, float]:
        """NDCG@k and HR@k over the full item set, history items excluded, ties counted against the target."""
        was_training = model.training
        model.eval()
        ndcg = hr = 0.0
        for ids, tgt, rows, cols in self.batches:
            scores = model.score_items(ids.to(device)).float()
            scores[rows.to(device), cols.to(device)] = -math.inf
            tgt = tgt.to(device)
            known = tgt >= 0
            t_score = scores.gather(1, tgt.clamp(min=0)[:, None])
            rank = (scores >= t_score).sum(1) - 1
            hit = known & (rank < k) & torch.isfinite(t_score[:, 0])
            ndcg += float((hit / torch.log2(rank.float() + 2)).sum())
            hr += float(hit.sum())
        model.train(was_training)
        return {f"ndcg@{k}": ndcg / max(self.n, 1), f"hr@{k}": hr / max(self.n, 1)}


def write_checkpoint(ckpt: Path, name: str, tag: str, write: Callable[[Path], None], acc=None) -> Path:
    """Write the checkpoint `ckpt/name` so that a crash at any moment leaves the previous one whole.

    `write` fills a fresh directory `name.<tag>`; its files are flushed to disk, then `ckpt/name`, a relative
    symlink, is switched to it by one os.replace (the commit), and older `name.*` directories are removed.
    With `acc` every process writes (accelerate's save_state) and the main process commits.
    """
    main = acc is None or acc.is_main_process
    target, link = ckpt / f"{name}.{tag}", ckpt / name
    if link.is_symlink() and os.readlink(link) == target.name:  # a resumed run redoing the committed epoch:
        target = ckpt / f"{name}.{tag}.redo"  # never rewrite the live checkpoint in place
    if main:
        shutil.rmtree(target, ignore_errors=True)  # what a crash left of an earlier try at this tag
        target.mkdir(parents=True)
    if acc is not None:
        acc.wait_for_everyone()
    write(target)
    if acc is not None:
        acc.wait_for_everyone()
    if main:
        for p in sorted(target.rglob("*")):
            if p.is_file():
                fsync_path(p)
        fsync_path(target)
        tmp = ckpt / f".{name}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        if link.is_dir() and not link.is_symlink():  # a checkpoint written before links: set it aside
            os.rename(link, ckpt / f"{name}.legacy")
        os.replace(tmp, link)
        fsync_path(ckpt)
        for old in ckpt.glob(f"{name}.*"):
            if old != target and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
    if acc is not None:
        acc.wait_for_everyone()
    return link


def _save_last(acc, directory: Path, state: dict) -> None:
    """The resumable checkpoint: accelerate's state (every process) and the loop's counters (main)."""
    acc.save_state(str(directory))
    if acc.is_main_process:
        (directory / "trainer.json").write_text(json.dumps(state))


def check_resume(ckpt: Path, provenance: dict | None) -> None:
    """Refuse to resume checkpoints made on other data, another split, other ties or another seed: the
    resumed model would have trained on what this run holds out."""
    if provenance is None:
        return
    path = ckpt / PROVENANCE
    if not path.exists():
        raise ProvenanceError(f"{ckpt} holds checkpoints that record no provenance: they may have been trained "
                              "on this split's test targets; delete them or choose another output directory")
    stored = json.loads(path.read_text())
    diff = [k for k in RESUME_KEYS if stored.get(k) != provenance.get(k)]
    if diff:
        what = ", ".join(f"{k}: {stored.get(k)!r} there, {provenance.get(k)!r} now" for k in diff)
        raise ProvenanceError(f"{ckpt} holds checkpoints of another run ({what}); resuming would train on data "
                              "this run holds out. Delete them or choose another output directory.")


def train_sft(model: SeqRecLM, tokenizer: ItemTokenizer, sequences: Sequence[tuple[np.ndarray, np.ndarray | None]],
              valid=None, cfg: SFTConfig | None = None, provenance: dict | None = None,
              on_eval: Callable[[int, float], bool | None] | None = None) -> TrainResult:
    """Train `model` in place on next-item prediction; it ends holding the best validation weights.

    sequences: per user (catalog indices, action names or None), oldest first. valid: EvalCases or None
    (then training runs `max_epochs` or until `max_minutes`, and the last weights are kept).
    on_eval: called after each validation with (epoch, validation NDCG@10); a true return stops training
    (`stopped` = "callback"), as a hyper-parameter search's pruner asks of a hopeless trial.
    """
    from accelerate import Accelerator
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = cfg or SFTConfig()
    t_start = time.perf_counter()
    res = TrainResult()
    torch.manual_seed(cfg.seed)
    acc = Accelerator(cpu=cfg.cpu)
    narrative, max_len = model.cfg.narrative, model.cfg.max_len

    data = encode_sequences(tokenizer, sequences, max_len, narrative)
    if not data:
        raise ValueError("no training sequence has a next-item target (every sequence is empty or unknown)")
    lengths = np.array([len(t) for t, _ in data])
    n_targets = int(sum(sum(lab != IGNORE for lab in labels) for _, labels in data))
    vset = None
    if valid is not None and len(valid):
        vset = ValidationSet(tokenizer, valid.histories, valid.actions, valid.targets, max_len, narrative,
                             cfg.eval_batch_size)
    res.seconds["prep"] = time.perf_counter() - t_start

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    wrapped, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)

    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": 0, "bad_evals": 0, "history": []}
    if ckpt is not None and cfg.resume and (ckpt / "last" / "trainer.json").exists():
        check_resume(ckpt, provenance)
        acc.load_state(str(ckpt / "last"))
        state = json.loads((ckpt / "last" / "trainer.json").read_text())
        acc.print(f"resumed from {ckpt / 'last'} at epoch {state['epoch']}")
    if ckpt is not None and provenance is not None and acc.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / PROVENANCE).write_text(json.dumps(provenance, indent=2))  # every checkpoint below says its data
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ckpt is not None and (ckpt / "best" / "seqrec.json").exists() and state["epoch"] > 0:
        best_state = {k: v.detach().clone() for k, v in SeqRecLM.from_pretrained(ckpt / "best").state_dict().items()}

    rng = np.random.default_rng(cfg.seed + 1000 * state["epoch"])
    t_train = t_eval = 0.0
    res.stopped = "max_epochs"
    show_bar = cfg.progress and not cfg.quiet and acc.is_local_main_process and sys.stderr.isatty()
    progress = Progress(TextColumn(f"[bold]{cfg.label}[/] epoch {{task.fields[epoch]}}"), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f} {task.fields[valid]}"),
                        TimeElapsedColumn(), disable=not show_bar)
    no_valid = ("no held-out validation (refit on the validation targets)" if "refit" in cfg.label
                else "no validation set")

    def valid_text(entry: dict | None = None) -> str:
        if vset is None:
            return no_valid
        if entry is not None and "ndcg@10" in entry:
            return f"valid ndcg@10 {entry['ndcg@10']:.4f} hr@10 {entry['hr@10']:.4f} (best {state['best_ndcg']:.4f})"
        best = f" (best {state['best_ndcg']:.4f})" if state["best_ndcg"] >= 0 else ""
        return f"valid not evaluated this epoch (every {cfg.eval_every}){best}"

    with progress:
        task = progress.add_task("train", total=cfg.max_epochs, completed=state["epoch"], epoch=state["epoch"],
                                 loss=float("nan"), valid=valid_text())
        for epoch in range(state["epoch"] + 1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            wrapped.train()
            batches = _batches(lengths, cfg.batch_size, cfg.bucket_chunk, rng)
            # each process takes every num_processes-th batch; equal counts keep DDP in step
            per_proc = len(batches) // acc.num_processes if acc.num_processes > 1 else len(batches)
            mine = batches[acc.process_index::acc.num_processes][:per_proc]
            total_loss, n_steps = 0.0, 0
            for idx in mine:
                ids = pad_batch([data[i][0] for i in idx]).to(acc.device)
                labels = pad_batch([data[i][1] for i in idx], IGNORE).to(acc.device)
                loss = wrapped(ids, labels, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                if cfg.grad_clip:
                    acc.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                total_loss += float(loss.detach())
                n_steps += 1
            res.samples += n_targets
            t_train += time.perf_counter() - t0
            state["epoch"] = epoch
            entry = {"epoch": epoch, "loss": total_loss / max(n_steps, 1), "elapsed_s": time.perf_counter() - t_start}
            out_of_time = cfg.max_minutes is not None and (time.perf_counter() - t_start) > 60 * cfg.max_minutes
            stop_asked = False
            if vset is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or out_of_time):
                t1 = time.perf_counter()
                entry.update(vset.evaluate(model, acc.device))
                t_eval += time.perf_counter() - t1
                if entry["ndcg@10"] > state["best_ndcg"]:
                    state.update(best_ndcg=entry["ndcg@10"], best_epoch=epoch, bad_evals=0,
                                 best_elapsed_s=time.perf_counter() - t_start)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if ckpt is not None and acc.is_main_process:
                        write_checkpoint(ckpt, "best", f"e{epoch}", lambda d: model.save_pretrained(d, tokenizer))
                else:
                    state["bad_evals"] += 1
                stop_asked = on_eval is not None and bool(on_eval(epoch, entry["ndcg@10"]))
            state["history"].append(entry)
            if not show_bar and not cfg.quiet and acc.is_local_main_process:
                print(f"{time.strftime('%H:%M:%S')} {cfg.label} epoch {epoch}/{cfg.max_epochs} loss {entry['loss']:.4f} "
                      f"{valid_text(entry)} {entry['elapsed_s']:.0f}s", file=sys.stderr, flush=True)
            progress.update(task, completed=epoch, epoch=epoch, loss=entry["loss"], valid=valid_text(entry))
            if ckpt is not None:
                write_checkpoint(ckpt, "last", f"e{epoch}", lambda d: _save_last(acc, d, state), acc)
            if stop_asked:
                res.stopped = "callback"
                break
            if vset is not None and state["bad_evals"] >= cfg.patience:
                res.stopped = "patience"
                break
            if out_of_time:
                res.stopped = "time"
                break

    if vset is not None:
        model.load_state_dict(best_state)
    model.eval()
    res.best_epoch, res.best_ndcg, res.epochs = state["best_epoch"], state["best_ndcg"], state["epoch"]
    res.history = state["history"]
    res.seconds_to_best = state.get("best_elapsed_s", time.perf_counter() - t_start)
    res.seconds.update(train=t_train, eval=t_eval, total=time.perf_counter() - t_start)
    return res
