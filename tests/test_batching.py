"""Micro-batching of model inference (dragonrec.serve.batching): each caller gets exactly its own rows, waits
at most the bounded time, gets only its own exception; a batched model scores as the model does, and the
service answers the same with batching on and off. Plus the pipeline's scorer time budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import train_tiny

from dragonrec.embed import HashEmbedder
from dragonrec.serve.batching import BatchedModel, MicroBatcher


def run_threads(n: int, target) -> list:
    """Start n threads at once (a barrier) running target(i); their return values or exceptions, by i."""
    out: list = [None] * n
    barrier = threading.Barrier(n)

    def go(i: int) -> None:
        barrier.wait()
        try:
            out[i] = target(i)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


class Recording:
    """fn for a MicroBatcher: doubles each row, records batch sizes, raises on a negative row."""

    def __init__(self, delay: float = 0.0):
        self.sizes: list[int] = []
        self.delay = delay

    def __call__(self, rows: list[int]) -> list[int]:
        self.sizes.append(len(rows))
        time.sleep(self.delay)
        if any(r < 0 for r in rows):
            raise ValueError(f"negative row in {rows}")
        return [2 * r for r in rows]


def test_each_caller_gets_its_own_rows_and_batches_form():
    fn = Recording(delay=0.01)
    b = MicroBatcher(fn, max_batch=8, max_wait_s=0.05)
    # caller i submits i+1 rows: 100*i, 100*i+1, ...
    out = run_threads(12, lambda i: b.submit([100 * i + k for k in range(i % 3 + 1)]))
    for i, got in enumerate(out):
        assert got == [2 * (100 * i + k) for k in range(i % 3 + 1)]
    assert sum(fn.sizes) == sum(i % 3 + 1 for i in range(12))
    assert max(fn.sizes) <= 8  # never more than max_batch rows in one call
    assert len(fn.sizes) < 12  # concurrent callers shared calls
    assert b.stats.batches == len(fn.sizes) and b.stats.largest == max(fn.sizes)


def test_bounded_wait_and_full_batches_run_at_once():
    fn = Recording()
    alone = MicroBatcher(fn, max_batch=64, max_wait_s=0.05)
    t = time.perf_counter()
    assert alone.submit([1]) == [2]
    waited = time.perf_counter() - t
    assert 0.04 <= waited < 0.5  # waited for company, but no longer than the bound (plus scheduling)
    # a batch that fills up runs without waiting out a long max_wait
    full = MicroBatcher(Recording(), max_batch=4, max_wait_s=5.0)
    t = time.perf_counter()
    out = run_threads(4, lambda i: full.submit([i]))
    assert out == [[0], [2], [4], [6]]
    assert time.perf_counter() - t < 2.0
    # one caller with more rows than max_batch runs alone, unsplit
    big = Recording()
    assert MicroBatcher(big, max_batch=2, max_wait_s=0.0).submit([1, 2, 3]) == [2, 4, 6]
    assert big.sizes == [3]


def test_an_exception_goes_only_to_the_caller_whose_rows_raised_it():
    fn = Recording(delay=0.01)
    b = MicroBatcher(fn, max_batch=16, max_wait_s=0.05)
    out = run_threads(6, lambda i: b.submit([-1 if i == 3 else i, 10 + i]))
    for i, got in enumerate(out):
        if i == 3:
            assert isinstance(got, ValueError) and "negative" in str(got)
        else:
            assert got == [2 * i, 2 * (10 + i)]
    assert b.stats.retried >= 1  # the shared batch raised and was re-run caller by caller
    # and the batcher keeps working afterwards
    assert b.submit([5]) == [10]


def test_many_callers_each_get_their_rows_and_the_lead_always_passes_on():
    """32 threads x 60 calls of 1-3 rows each, some raising: every call returns its own doubled rows (or its
    own error), no thread is left waiting, and the batcher is idle afterwards (the last leader handed the lead
    to a waiting caller each time, or gave it up when none waited)."""
    fn = Recording(delay=0.0005)
    b = MicroBatcher(fn, max_batch=8, max_wait_s=0.0)
    bad: list[str] = []

    def caller(i: int) -> None:
        rng = np.random.default_rng(i)
        for k in range(60):
            rows = [int(x) for x in rng.integers(0, 1000, size=int(rng.integers(1, 4)))]
            if k % 17 == i % 17:
                rows[0] = -1
            try:
                got = b.submit(rows)
                if got != [2 * r for r in rows]:
                    bad.append(f"caller {i} call {k}: {got} for {rows}")
            except ValueError:
                if rows[0] != -1:
                    bad.append(f"caller {i} call {k}: an error for {rows}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller was left waiting"
    assert bad == []
    assert b.stats.calls == 32 * 60 and not b._leading and not b._queue
    assert b.stats.batches < b.stats.calls  # concurrent callers shared batches
    assert b.submit([4]) == [8]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny sasrec model fitted for one epoch on a chain-like dataset of 40 items."""
    from conftest import chain_events, chain_items

    from dragonrec.data import load_dataset
    from dragonrec.recommenders.sequential import SequentialRecommender

    d = tmp_path_factory.mktemp("chain40")
    chain_items(40).to_parquet(d / "items.parquet")
    chain_events(n_users=120, n_items=40, length=8).to_parquet(d / "interactions.parquet")
    model_dir = train_tiny(d, d / "model")
    ds = load_dataset(d)
    return d, model_dir, SequentialRecommender.load(model_dir, ds.catalog)


def test_batched_model_scores_each_history_as_the_model_does(tiny_model):
    _, _, model = tiny_model
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 40, size=int(rng.integers(1, 9))) for _ in range(10)]
    actions = [np.asarray(rng.choice(["purchase", "view", "scroll_past"], size=len(h)), dtype=object)
               for h in histories]
    alone = [model.score([h], [a])[0] for h, a in zip(histories, actions)]
    wrapped = BatchedModel(model, max_batch=8, max_wait_s=0.05)
    got = run_threads(10, lambda i: wrapped.score([histories[i]], [actions[i]])[0])
    for i in range(10):
        np.testing.assert_allclose(got[i], alone[i], rtol=1e-5, atol=1e-6)
    assert wrapped.stats()["batches"] < 10
    # rows without actions are scored as the model scores them without actions (not mixed with the others)
    no_actions = wrapped.score(histories[:3])
    np.testing.assert_allclose(no_actions, model.score(histories[:3]), rtol=1e-5, atol=1e-6)
    # the same history again is answered from the cache, unchanged, and callers cannot corrupt it
    hits = wrapped.cache_hits
    again = wrapped.score([histories[0]], [actions[0]])
    again[:] = 0.0
    np.testing.assert_allclose(wrapped.score([histories[0]], [actions[0]])[0], alone[0], rtol=1e-5, atol=1e-6)
    assert wrapped.cache_hits == hits + 2
    assert wrapped.name == model.name and wrapped.catalog is model.catalog


def test_service_answers_the_same_with_batching_on_and_off(tiny_model, tmp_path: Path):
    from dragonrec.registry import Registry
    from dragonrec.serve import Service, Settings
    from dragonrec.serve.schemas import RecommendRequest

    data, model_dir, _ = tiny_model
    answers = {}
    users = [f"u{u:03d}" for u in range(8)] + ["someone-new"]
    for on in (True, False):
        state = tmp_path / f"state-{on}"
        Registry(state / "registry").register(model_dir, method="sft", activate=True)
        s = Settings(data_dir=data, state_dir=state, embedding_cache_dir=None, batch_inference=on,
                     batch_max_wait_ms=20.0)
        with Service(s, embedder=HashEmbedder()) as service:
            assert service.model_version != "popularity"
            # the batcher wraps the model as served over the (grown) catalog
            assert (type(service.serving.pipeline.model).__name__ == "BatchedModel") is on
            ask = service.recommend
            got = run_threads(len(users), lambda i, ask=ask: ask(RecommendRequest(user_id=users[i], n=5)))
            answers[on] = [[(r.item_id, round(r.score, 4), r.source) for r in resp.items] for resp in got]
            if on:  # the concurrent requests really shared passes of the pipeline and of the model
                assert service.serving.pipeline.rank_batcher.stats.largest > 1
                assert service.serving.pipeline.model.stats()["largest"] > 1
            else:
                assert service.serving.pipeline.rank_batcher is None
    assert answers[True] == answers[False]
    assert all(len(a) == 5 for a in answers[True])


def test_a_slow_scorer_is_not_waited_for_the_model_orders_the_list(chain_dataset):
    """Over its time budget, a request answers with the rest source's (the model's) order, marked degraded."""
    from dragonrec.pipeline import Pipeline, PipelineConfig
    from dragonrec.recommenders.cooccurrence import CooccurrenceRecommender
    from dragonrec.scorers.base import Scorer, ScoreResult
    from dragonrec.scorers.model import ModelScorer

    class SlowScorer(Scorer):
        name = "slow-llm"

        def score(self, request):
            time.sleep(2.0)
            return ScoreResult(np.zeros(len(request.candidates), np.float32), [None] * len(request.candidates))

    model = CooccurrenceRecommender().fit(chain_dataset.events, chain_dataset.catalog)
    cfg = {"sources": {"model": 6, "popularity": 6}, "model": "cooccurrence", "rest": "model"}
    slow = Pipeline(PipelineConfig(**cfg, scorer_timeout_s=0.1), model=model, scorer=SlowScorer())
    slow.fit(chain_dataset.events, chain_dataset.catalog)
    fast = Pipeline(PipelineConfig(**cfg), model=model, scorer=ModelScorer(model))
    fast.fit(chain_dataset.events, chain_dataset.catalog)
    history = [3, 4, 5]
    t = time.perf_counter()
    recs = slow.recommend_for(history, n=5)
    assert time.perf_counter() - t < 1.0  # answered within the budget (plus the pipeline), not after 2 s
    assert recs.degraded and "budget" in recs.degraded_reason and "cooccurrence" in recs.degraded_reason
    assert recs.items == fast.recommend_for(history, n=5).items  # the model's own order
    assert recs.items[0] == "i06"  # the chain's next item
    assert slow.stats()["degraded"] == 1


def test_concurrent_event_posts_share_commits_and_each_gets_its_own_answer(tiny_model, tmp_path: Path):
    """Group commit of events through the service: 24 requests at once, the second dozen repeating the first's
    event ids. Every event is stored once, each request is answered for its own events (accepted or duplicate,
    whichever of a pair committed first), and some requests really shared a transaction."""
    from dragonrec.serve import Service, Settings
    from dragonrec.serve.schemas import EventIn

    data, _, _ = tiny_model
    s = Settings(data_dir=data, state_dir=tmp_path / "state", embedding_cache_dir=None)
    with Service(s, embedder=HashEmbedder()) as service:
        items = [str(i) for i in service.serving.catalog.item_ids[:4]]

        def post(i: int):
            k = i % 12
            return service.ingest([EventIn(event_id=f"e{k}", user_id=f"shopper{k}", item_id=items[k % 4],
                                           action="click")])

        got = run_threads(24, post)
        assert not [g for g in got if isinstance(g, Exception)]
        for k in range(12):  # of the two requests with event e<k>, exactly one stored it
            assert sorted((got[k].accepted, got[k + 12].accepted)) == [0, 1]
            assert got[k].duplicates + got[k + 12].duplicates == 1
        assert service.store.counts().events == 12
        assert service._events.stats.largest > 1
