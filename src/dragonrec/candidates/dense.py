"""Dense retrieval: the user's query vector -> top-K catalog items from the FAISS index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dragonrec.index import VectorIndex


@dataclass
class Candidates:
    """Top-K per query in retrieval order: catalog indices [B, K] (-1 pads) and similarities [B, K] (-inf pads)."""

    items: np.ndarray
    scores: np.ndarray

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        keep = self.items[b] >= 0
        return self.items[b][keep], self.scores[b][keep]


class DenseRetriever:
    """Searches a VectorIndex and speaks catalog indices (labels of items outside the catalog are dropped)."""

    def __init__(self, index: VectorIndex, catalog_ids: Sequence[str]):
        self.index = index
        pos = {item_id: i for i, item_id in enumerate(catalog_ids)}
        self.label_to_idx = np.asarray([pos.get(i, -1) if i is not None else -1 for i in index.item_ids] + [-1],
                                       dtype=np.int64)

    def retrieve(self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> Candidates:
        """The k most similar items per query row, never an item of `exclude[b]` (e.g. the history)."""
        queries = np.atleast_2d(queries)
        B = len(queries)
        n_excl = max((len(np.unique(e)) for e in exclude), default=0) if exclude is not None else 0
        hits = self.index.search(queries, k + n_excl)
        labels = np.where(hits.labels < 0, len(self.label_to_idx) - 1, hits.labels)
        items = self.label_to_idx[labels]
        scores = np.where(items < 0, -np.inf, hits.scores)
        out_i = np.full((B, k), -1, dtype=np.int64)
        out_s = np.full((B, k), -np.inf, dtype=np.float32)
        for b in range(B):
            keep = items[b] >= 0
            if exclude is not None and len(exclude[b]):
                keep &= ~np.isin(items[b], exclude[b])
            it, sc = items[b][keep][:k], scores[b][keep][:k]
            out_i[b, :len(it)], out_s[b, :len(sc)] = it, sc
        return Candidates(out_i, out_s)
