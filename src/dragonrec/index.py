"""FAISS inner-product index over item embeddings: exact (flat) by default, IVF or HNSW for large catalogs,
with add/remove without a rebuild, saved beside its metadata (item ids, model name, dimension).

    index = VectorIndex.build(vectors, item_ids, model="all-MiniLM-L6-v2")
    hits = index.search(query_vectors, k=50)          # hits.scores, hits.labels, index.item_ids_of(hits.labels)
    index.add(new_vectors, ["B00NEW"]); index.remove(["B00OLD"]); index.save("artifacts/index")

Every item keeps its integer label across adds and removals (IVF stores labels itself, flat and HNSW are
wrapped in an `IndexIDMap2`). Flat and IVF
remove vectors for real; HNSW cannot, so removed HNSW labels become tombstones that searches skip (a rebuild
drops them for good).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict

from dragonrec.progress import log
from dragonrec.registry import fsync_path

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
META_FILE = "meta.json"
INDEX_FILE = "index.faiss"


class IndexConfig(BaseModel):
    """How to index item vectors."""

    model_config = ConfigDict(frozen=True)

    kind: IndexKind = "auto"
    """flat (exact), ivf or hnsw (approximate); auto = flat up to `auto_flat_max` items, ivf above."""
    auto_flat_max: int = 200_000
    """Largest catalog that `auto` indexes exactly (a flat query over 200k x 384 takes a few ms)."""
    nlist: int | None = None
    """IVF cells; None = about sqrt(n) (at least 16)."""
    nprobe: int = 16
    """IVF cells visited per query (recall vs speed)."""
    train_per_cell: int = 64
    """IVF k-means sample: at most this many vectors per cell (faiss's own default is 256)."""
    hnsw_m: int = 32
    """HNSW neighbours per node."""
    ef_construction: int = 40
    """HNSW build beam width."""
    ef_search: int = 64
    """HNSW search beam width (recall vs speed)."""
    seed: int = 0
    """Seed of the IVF training sample."""
    small_batch_threads: int = 1
    """OpenMP threads for searches of at most 8 queries (0 = faiss default). One thread: a single query gains
    nothing from more, and on a busy machine their barrier waits cost ~20 ms (measured: bench_index.py)."""

    def resolve(self, n: int) -> Literal["flat", "ivf", "hnsw"]:
        if self.kind != "auto":
            return self.kind
        return "flat" if n <= self.auto_flat_max else "ivf"


@dataclass
class SearchHits:
    """Top-k per query: scores (inner products) and labels, [B, k]; label -1 / score -inf where fewer hits."""

    scores: np.ndarray
    labels: np.ndarray


class VectorIndex:
    """An ID-mapped FAISS index plus the metadata that says what its vectors are.

    Labels are int64; `item_ids[label]` names the item (labels are never reused, so a removed item's label
    stays free). Built from a catalog, label i is catalog index i.
    """

    def __init__(self, index: faiss.Index, kind: str, dim: int, model: str, item_ids: list[str | None],
                 cfg: IndexConfig, deleted: set[int] | None = None):
        self.index, self.kind, self.dim, self.model, self.cfg = index, kind, dim, model, cfg
        self.item_ids = item_ids  # label -> item id (None once removed)
        self._label = {item_id: i for i, item_id in enumerate(item_ids) if item_id is not None}
        self.deleted = deleted or set()  # HNSW tombstones
        self._selector = None

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, item_ids: Sequence[str], model: str = "unknown",
              cfg: IndexConfig | None = None) -> VectorIndex:
        """Index `vectors[i]` under label i for item `item_ids[i]` (unit vectors: inner product = cosine)."""
        cfg = cfg or IndexConfig()
        vectors = _check_vectors(vectors)
        item_ids = [str(i) for i in item_ids]
        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(item_ids)} item ids")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item ids must be unique")
        n, dim = vectors.shape
        kind = cfg.resolve(n)
        if kind == "flat":
            inner = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = cfg.nlist or max(16, round(math.sqrt(max(n, 1))))
            if n < nlist:
                raise ValueError(f"IVF with {nlist} cells needs at least {nlist} vectors, got {n}: use kind='flat'")
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.cp.seed = cfg.seed
            sample = min(n, nlist * cfg.train_per_cell)
            rows = np.random.default_rng(cfg.seed).choice(n, size=sample, replace=False) if sample < n else slice(None)
            t0 = time.perf_counter()
            inner.train(vectors[rows])
            log(None, f"index: trained IVF with {nlist} cells on {sample} vectors ({time.perf_counter() - t0:.1f}s)",
                quiet=n < 100_000)
            inner.nprobe = cfg.nprobe
            # IVF keeps ids itself; an IndexIDMap around it mislabels vectors after remove_ids (it assumes
            # the inner index renumbers like a flat one). The hash-table direct map allows reconstruct.
            inner.set_direct_map_type(faiss.DirectMap.Hashtable)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = cfg.ef_construction
            inner.hnsw.efSearch = cfg.ef_search
        else:
            raise ValueError(f"unknown index kind {kind!r} (flat, ivf, hnsw or auto)")
        index = inner if kind == "ivf" else faiss.IndexIDMap2(inner)
        t0 = time.perf_counter()
        index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        log(None, f"index: {kind} over {n} vectors of dim {dim} built in {time.perf_counter() - t0:.1f}s",
            quiet=n < 100_000)  # small catalogs build in well under a second
        return cls(index, kind, dim, model, list(item_ids), cfg)

    def add(self, vectors: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Add items (an id already present is replaced); returns their labels."""
        vectors = _check_vectors(vectors, self.dim)
        item_ids = [str(i) for i in item_ids]
        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(item_ids)} item ids")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item ids must be unique")
        present = [i for i in item_ids if i in self._label]
        if present:
            self.remove(present)
        labels = np.arange(len(self.item_ids), len(self.item_ids) + len(item_ids), dtype=np.int64)
        self.index.add_with_ids(vectors, labels)
        for label, item_id in zip(labels.tolist(), item_ids):
            self.item_ids.append(item_id)
            self._label[item_id] = label
        return labels

    def remove(self, item_ids: Sequence[str]) -> int:
        """Remove items by id; unknown ids raise KeyError (nothing is removed then). Returns how many."""
        missing = [i for i in item_ids if str(i) not in self._label]
        if missing:
            raise KeyError(f"not in the index: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        labels = np.asarray([self._label.pop(str(i)) for i in item_ids], dtype=np.int64)
        for label in labels.tolist():
            self.item_ids[label] = None
        if self.kind == "hnsw":
            self.deleted.update(labels.tolist())
            self._selector = None
        else:
            self.index.remove_ids(labels)
        return len(labels)

    # -- querying -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._label)

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self._label

    def label_of(self, item_id: str) -> int:
        return self._label[str(item_id)]

    def item_ids_of(self, labels: np.ndarray) -> np.ndarray:
        """Item ids for labels (None for -1), same shape."""
        table = np.asarray(self.item_ids + [None], dtype=object)
        return table[np.where(np.asarray(labels) < 0, len(self.item_ids), labels)]

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """The k nearest items by inner product for each query row ([B, dim] or [dim])."""
        q = _check_vectors(np.atleast_2d(queries), self.dim)
        k = int(min(k, len(self)))
        if k <= 0:
            return SearchHits(np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64))
        params = self._search_params()
        with _omp_threads(self.cfg.small_batch_threads if len(q) <= 8 else 0):
            scores, labels = self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        scores = np.where(labels < 0, -np.inf, scores).astype(np.float32)
        return SearchHits(scores, labels.astype(np.int64))

    def _search_params(self):
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=self.cfg.nprobe)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=self.cfg.ef_search)
            if self.deleted:
                if self._selector is None:
                    batch = faiss.IDSelectorBatch(np.asarray(sorted(self.deleted), dtype=np.int64))
                    # keep `batch` alive as long as the selector that points at it
                    self._selector = (faiss.IDSelectorNot(batch), batch)
                params.sel = self._selector[0]
            return params
        return None

    def vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of items (IndexIDMap2 keeps the label -> vector link)."""
        return np.stack([self.index.reconstruct(self.label_of(i)) for i in item_ids]).astype(np.float32)

    # -- persistence --------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"model": self.model, "dim": self.dim, "kind": self.kind, "metric": "inner_product",
                "n_items": len(self), "item_ids": self.item_ids, "deleted": sorted(self.deleted),
                "config": self.cfg.model_dump(), "faiss_version": faiss.__version__}

    def save(self, path: str | Path) -> Path:
        """Write the index and `meta.json` into the folder `path` (created if missing), crash-safe.

        The index goes to a new file of its own (`index.<token>.faiss`, flushed to disk), then `meta.json`,
        which names that file, replaces the old one in one `os.replace`: the commit point. A crash at any
        moment leaves the previous save or this one, whole (never a new index under old metadata); files of
        older saves are removed only after the commit.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        name = f"index.{uuid.uuid4().hex[:12]}.faiss"
        tmp = path / f".{name}.tmp"
        faiss.write_index(self.index, str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path / name)
        meta_tmp = path / f".{META_FILE}.{uuid.uuid4().hex[:12]}.tmp"
        with open(meta_tmp, "w") as f:
            json.dump({**self.meta(), "index_file": name}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, path / META_FILE)
        fsync_path(path)  # the directory: both renames are on disk before anything old goes
        for old in path.glob("index*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)
        for stale in path.glob(".*.tmp"):  # leftovers of a save that crashed before its commit
            stale.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model: str | None = None, dim: int | None = None) -> VectorIndex:
        """Read a saved index; `model`/`dim`, when given, must match what it was built with."""
        path = Path(path)
        if not (path / META_FILE).exists():
            raise FileNotFoundError(f"{path}: no saved index ({META_FILE} and the index file it names)")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / META_FILE} is not valid JSON ({e}): rebuild the index") from None
        index_path = path / meta.get("index_file", INDEX_FILE)  # saves before crash-safe saving: index.faiss
        if not index_path.exists():
            raise FileNotFoundError(f"{path}: {META_FILE} names {index_path.name}, which is missing: rebuild the index")
        if model is not None and meta["model"] != model:
            raise ValueError(f"{path}: index built with {meta['model']!r}, not {model!r}: rebuild it")
        if dim is not None and meta["dim"] != dim:
            raise ValueError(f"{path}: index has dimension {meta['dim']}, not {dim}")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise ValueError(f"{index_path}: not a readable FAISS index ({str(e).splitlines()[0]}): rebuild it") from None
        if index.d != meta["dim"]:
            raise ValueError(f"{path}: index dimension {index.d} disagrees with its metadata ({meta['dim']})")
        return cls(index, meta["kind"], meta["dim"], meta["model"], meta["item_ids"],
                   IndexConfig(**meta["config"]), set(meta.get("deleted", [])))

    def nbytes(self) -> int:
        """Size of the serialised index in bytes."""
        return int(faiss.serialize_index(self.index).nbytes)


@contextlib.contextmanager
def _omp_threads(n: int):
    """Run faiss with n OpenMP threads inside the block (n <= 0: unchanged). The setting is process-wide."""
    if n <= 0:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _check_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D [n, dim], got shape {v.shape}")
    if dim is not None and v.shape[1] != dim:
        raise ValueError(f"vectors have dimension {v.shape[1]}, the index has {dim}")
    if not np.isfinite(v).all():
        raise ValueError("vectors contain NaN or inf")
    return v
