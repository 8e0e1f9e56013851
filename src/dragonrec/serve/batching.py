"""Micro-batching of model inference across concurrent requests: rows that arrive while a forward pass runs (or
within a short wait) share the next one.

    batcher = MicroBatcher(lambda rows: [f(r) for r in rows], max_batch=16, max_wait_s=0.002)
    outs = batcher.submit([row_a, row_b])          # from any thread; returns this caller's outputs only
    model = BatchedModel(fitted_recommender)       # .score(histories, actions) batched across threads
    batch_pipeline(pipeline)                       # concurrent recommend_for calls share every stage

No worker thread: the first caller that finds no batch running becomes the leader, waits at most
`max_wait_s` for the batch to fill (up to `max_batch` rows), runs it and hands every caller its own rows;
callers arriving meanwhile queue for the next batch, so under load batches grow by themselves and with one
client nothing waits longer than `max_wait_s`. Nothing needs starting or stopping, and a `Serving` that is
swapped out leaves nothing running behind it.

A batch that raises is re-run caller by caller, so an exception reaches only the caller whose input caused
it; the others get their rows.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BatchStats:
    """What the batcher did since it was built."""

    calls: int = 0  # submit() calls
    rows: int = 0  # rows submitted
    batches: int = 0  # times fn ran on a combined batch
    largest: int = 0  # most rows in one batch
    retried: int = 0  # batches that raised and were re-run caller by caller

    def as_dict(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "batches": self.batches, "largest": self.largest,
                "mean_rows": self.rows / self.batches if self.batches else 0.0, "retried": self.retried}


@dataclass
class _Job:
    rows: list
    done: bool = False
    result: list | None = None
    error: BaseException | None = None
    at: float = field(default_factory=time.perf_counter)
    # set when the job is done, or when the previous leader hands this job's caller the lead: each waiting
    # caller sleeps on its own event, so a finished batch wakes its own callers and one next leader, not every
    # waiting thread (a notify_all per batch woke them all to find their rows still queued)
    wake: threading.Event = field(default_factory=threading.Event)


class MicroBatcher(Generic[T, R]):
    """Runs `fn(rows) -> outputs` (one output per row, same order) on the rows of concurrent `submit` calls.

    `max_batch`: most rows in one call of `fn` (a caller's rows are never split; one caller with more rows
    runs alone); `max_wait_s`: how long the leader waits for more rows before it runs a batch that is not
    full (0: run at once with what is queued)."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch: int = 16, max_wait_s: float = 0.002):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._leading = False

    def submit(self, rows: Sequence[T]) -> list[R]:
        """This caller's outputs for `rows` (in order); raises what `fn` raised on these rows."""
        job = _Job(list(rows))
        if not job.rows:
            return []
        with self._cond:
            self.stats.calls += 1
            self.stats.rows += len(job.rows)
            self._queue.append(job)
            self._cond.notify()  # a leader waiting for company (max_wait_s) may now have a full batch
            lead = not self._leading
            self._leading = True
        if not lead:
            job.wake.wait()  # done, or handed the lead (then its rows are still queued)
        while not job.done:  # leading: run the oldest queued jobs until this caller's rows have run
            with self._cond:
                batch = self._gather()
            try:
                self._run(batch)
            except BaseException:  # KeyboardInterrupt and the like: leave, but never leave the others leaderless
                with self._cond:
                    if job in self._queue:
                        self._queue.remove(job)
                    self._hand_over()
                raise
            if job.done:
                with self._cond:
                    self._hand_over()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _hand_over(self) -> None:
        """Under the lock, from the leader that is done: the oldest waiting caller leads next (its rows are
        queued), or nobody leads while nothing waits."""
        if self._queue:
            self._queue[0].wake.set()
        else:
            self._leading = False

    def _gather(self) -> list[_Job]:
        """Under the lock: wait (at most max_wait_s after the oldest queued row) until max_batch rows are
        queued, then take the oldest jobs that fit (at least one)."""
        deadline = self._queue[0].at + self.max_wait_s
        while sum(len(j.rows) for j in self._queue) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._cond.wait(left)
        batch, size = [], 0
        while self._queue and (not batch or size + len(self._queue[0].rows) <= self.max_batch):
            job = self._queue.pop(0)
            batch.append(job)
            size += len(job.rows)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        """Outside the lock: fn on the whole batch; if it raises (or answers the wrong number of rows), fn
        again per job, so each job gets its own result or its own exception."""
        rows = [r for job in batch for r in job.rows]
        self.stats.batches += 1
        self.stats.largest = max(self.stats.largest, len(rows))
        try:
            try:
                out = list(self.fn(rows))
                if len(out) != len(rows):
                    raise RuntimeError(f"the batched function answered {len(out)} rows for {len(rows)}")
            except Exception as e:  # noqa: BLE001 - handed to the caller(s) whose rows raised it
                if len(batch) == 1:  # its own rows: no need to run them again
                    batch[0].error, batch[0].done = e, True
                    batch[0].wake.set()
                    return
                self.stats.retried += 1
                for job in batch:
                    self._run_one(job)
                return
            k = 0
            for job in batch:
                job.result, job.done = out[k:k + len(job.rows)], True
                job.wake.set()
                k += len(job.rows)
        except BaseException as e:  # KeyboardInterrupt and the like: no caller may wait forever
            for job in batch:
                if not job.done:
                    job.error, job.done = e, True
                    job.wake.set()
            raise

    def _run_one(self, job: _Job) -> None:
        try:
            out = list(self.fn(job.rows))
            if len(out) != len(job.rows):
                raise RuntimeError(f"the batched function answered {len(out)} rows for {len(job.rows)}")
            job.result = out
        except Exception as e:  # noqa: BLE001 - handed to the caller that submitted these rows
            job.error = e
        job.done = True
        job.wake.set()


Row = tuple[np.ndarray, Any]  # (history [catalog indices], actions or None)


class BatchedModel:
    """A fitted recommender whose `score()` calls from concurrent requests share forward passes.

    Each history row is one batch row; rows with and without actions run in separate model calls (a model
    reads a missing action list differently from any given one). A small cache of the latest rows answers a
    row seen moments ago without a forward pass: a request asks the model twice for the same history (the
    model's candidates and the scorer), and the model is deterministic (eval mode), so the answer is the same.
    Every other attribute is the wrapped model's."""

    def __init__(self, model: Any, max_batch: int = 16, max_wait_s: float = 0.002, cache_mb: float = 64.0):
        self.model = model
        self.batcher: MicroBatcher[Row, np.ndarray] = MicroBatcher(self._score_rows, max_batch, max_wait_s)
        n = max(len(getattr(model, "catalog", ())), 1)
        self.cache_rows = int(cache_mb * 2**20 // (4 * n))  # [n] float32 rows
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_hits = 0

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (a copy in the making): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def score(self, histories: Sequence[np.ndarray], actions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[B, len(catalog)] float32, as the wrapped model's `score` answers."""
        rows = [(np.asarray(h, dtype=np.int64), None if actions is None else np.asarray(actions[b], dtype=object))
                for b, h in enumerate(histories)]
        if not rows:
            return np.asarray(self.model.score([], None if actions is None else []), dtype=np.float32)
        keys = [_key(r) for r in rows]
        out: list[np.ndarray | None] = [None] * len(rows)
        with self._cache_lock:
            for b, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is not None:
                    self._cache.move_to_end(k)
                    out[b] = hit
                    self.cache_hits += 1
        todo = [b for b in range(len(rows)) if out[b] is None]
        if todo:
            for b, row in zip(todo, self.batcher.submit([rows[b] for b in todo])):
                out[b] = row
            if self.cache_rows:
                with self._cache_lock:
                    for b in todo:
                        self._cache[keys[b]] = out[b]
                        self._cache.move_to_end(keys[b])
                    while len(self._cache) > self.cache_rows:
                        self._cache.popitem(last=False)
        return np.stack(out)  # a new array: callers may write into it, cached rows stay as they were

    def _score_rows(self, rows: list[Row]) -> list[np.ndarray]:
        """One model call per kind of row (with actions, without), in one batch each."""
        out: list[np.ndarray | None] = [None] * len(rows)
        for with_actions in (True, False):
            idx = [i for i, (_, a) in enumerate(rows) if (a is not None) == with_actions]
            if not idx:
                continue
            hist = [rows[i][0] for i in idx]
            acts = [rows[i][1] for i in idx] if with_actions else None
            scores = np.asarray(self.model.score(hist, acts), dtype=np.float32)
            if scores.shape[0] != len(idx):
                raise RuntimeError(f"{getattr(self.model, 'name', 'model')} scored {scores.shape[0]} rows for "
                                   f"{len(idx)}")
            for j, i in enumerate(idx):
                out[i] = scores[j]
        return out  # type: ignore[return-value]

    def stats(self) -> dict:
        return {**self.batcher.stats.as_dict(), "cache_hits": self.cache_hits}


def _key(row: Row) -> tuple:
    h, a = row
    return h.tobytes(), None if a is None else tuple(str(x) for x in a)


def batched(model: Any, enabled: bool = True, max_batch: int = 16, max_wait_ms: float = 2.0) -> Any:
    """`model` wrapped in a BatchedModel when `enabled` (None stays None)."""
    if model is None or not enabled:
        return model
    return BatchedModel(model, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0)


def batch_pipeline(pipeline: Any, enabled: bool = True, max_batch: int = 16, max_wait_ms: float = 2.0) -> Any:
    """Let concurrent `pipeline.recommend_for` calls share one pass of every stage: one FAISS search, one
    co-occurrence product, one model forward and one scoring call for the whole batch (`Pipeline.rank_rows`),
    each request finishing its own list. Returns the pipeline."""
    pipeline.rank_batcher = MicroBatcher(pipeline.rank_rows, max_batch, max_wait_ms / 1000.0) if enabled else None
    return pipeline


__all__ = ["BatchStats", "BatchedModel", "MicroBatcher", "batch_pipeline", "batched"]
