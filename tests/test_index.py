"""FAISS index: exact answers, approximate kinds agree on easy data, add/remove without rebuild, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from dragonrec.embed import normalize
from dragonrec.index import IndexConfig, VectorIndex


def clustered(n: int = 600, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    return normalize(centers[rng.integers(20, size=n)] + 0.1 * rng.normal(size=(n, dim)))


def ids(n: int) -> list[str]:
    return [f"item{i}" for i in range(n)]


def test_flat_search_is_exact_and_maps_ids():
    v = clustered()
    index = VectorIndex.build(v, ids(len(v)), model="m")
    assert index.kind == "flat" and len(index) == len(v)
    q = v[[3, 77]]
    hits = index.search(q, k=10)
    expected = np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(hits.scores, np.take_along_axis(q @ v.T, expected, axis=1), rtol=1e-5)
    assert hits.labels[0, 0] == 3 and index.item_ids_of(hits.labels)[1, 0] == "item77"
    assert index.search(v[0], k=5).labels.shape == (1, 5)  # one query as a 1-D vector


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_the_true_neighbours_on_clustered_data(kind):
    v = clustered()
    index = VectorIndex.build(v, ids(len(v)), cfg=IndexConfig(kind=kind, nlist=16, nprobe=8))
    exact = VectorIndex.build(v, ids(len(v)), cfg=IndexConfig(kind="flat"))
    q = v[:50]
    a, b = index.search(q, 10).labels, exact.search(q, 10).labels
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    assert recall > 0.9


def test_auto_kind_is_chosen_by_size():
    assert IndexConfig().resolve(10_000) == "flat"
    assert IndexConfig().resolve(1_000_000) == "ivf"
    assert IndexConfig(kind="hnsw").resolve(10) == "hnsw"
    assert IndexConfig(auto_flat_max=100).resolve(101) == "ivf"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_and_remove_without_rebuild(kind, tmp_path):
    v = clustered()
    index = VectorIndex.build(v[:500], ids(500), model="m", cfg=IndexConfig(kind=kind, nlist=16, nprobe=16))
    # removing the best match of a query makes the next one come first
    first = index.search(v[10], 3).labels[0]
    assert first[0] == 10
    assert index.remove(["item10"]) == 1
    assert "item10" not in index and len(index) == 499
    hits = index.search(v[10], 2).labels[0]
    assert 10 not in hits and hits[0] in first[1:]  # (near-ties may swap under IVF)
    # adding a new item makes it findable under a fresh label; re-adding an id replaces it
    new = normalize(np.ones((1, v.shape[1]), dtype=np.float32))
    (label,) = index.add(new, ["brand-new"])
    assert label == 500 and index.search(new, 1).labels[0, 0] == 500
    index.add(v[[10]], ["brand-new"])
    assert index.search(v[10], 1).labels[0, 0] == 501 and len(index) == 500
    assert index.search(new, 600).labels.shape[1] == 500  # never more hits than live items
    # the state survives save/load, tombstones included
    index.save(tmp_path / "idx")
    back = VectorIndex.load(tmp_path / "idx", model="m", dim=v.shape[1])
    assert back.kind == kind and len(back) == 500
    np.testing.assert_array_equal(back.search(v[:20], 5).labels, index.search(v[:20], 5).labels)
    assert 10 not in back.search(v[10], 5).labels[0]
    np.testing.assert_allclose(back.vectors(["brand-new"])[0], v[10], rtol=1e-6)


def test_bad_input_is_refused_and_loses_nothing(tmp_path):
    v = clustered(50, 8)
    index = VectorIndex.build(v, ids(50), model="m")
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, 9), np.float32), 3)
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 8), np.nan, np.float32), ["x"])
    with pytest.raises(KeyError, match="nope"):
        index.remove(["item1", "nope"])
    assert len(index) == 50 and "item1" in index  # the partial remove did nothing
    with pytest.raises(ValueError, match="unique"):
        VectorIndex.build(v[:2], ["a", "a"])
    with pytest.raises(ValueError, match="at least"):
        VectorIndex.build(v[:10], ids(10), cfg=IndexConfig(kind="ivf", nlist=16))
    index.save(tmp_path / "i")
    with pytest.raises(ValueError, match="rebuild"):
        VectorIndex.load(tmp_path / "i", model="other")
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "missing")
