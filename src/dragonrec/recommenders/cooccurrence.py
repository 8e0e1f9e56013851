"""Item-to-item co-occurrence mined from sessions: "people who had A next had B".

Counts how often item j follows item i within `window` steps of the same session (a user's sequence, cut
where the log has session ids or a long gap), weighted by 1/distance. A user's score is the decayed sum of
the rows of their last `last_n` items; popularity breaks the remaining ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, Field

from dragonrec.data.catalog import Catalog
from dragonrec.data.stats import item_popularity, positives
from dragonrec.recommenders.base import Recommender
from dragonrec.schema import positive_mask


class CooccurrenceConfig(BaseModel):
    window: int = Field(5, ge=1, description="pairs up to this many steps apart co-occur")
    backward_weight: float = Field(0.25, ge=0, description="weight of j-before-i pairs (1 = symmetric, 0 = next only)")
    last_n: int = Field(3, ge=1, description="how many of the latest history items query the matrix")
    decay: float = Field(0.5, gt=0, le=1, description="weight of the k-th latest history item = decay**k")
    session_gap_hours: float = Field(24 * 365 * 100, description="a gap longer than this starts a new session")
    normalize: bool = Field(True, description="divide rows by the item's count^alpha (damps hub items)")
    alpha: float = Field(0.5, ge=0, le=1, description="exponent of the row normalisation")


class CooccurrenceRecommender(Recommender):
    name = "cooccurrence"

    def __init__(self, cfg: CooccurrenceConfig | None = None):
        self.cfg = cfg or CooccurrenceConfig()

    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        self.catalog = catalog
        n = len(catalog)
        cfg = self.cfg
        train = positives(train)  # items co-occur in interest; a scroll-past links nothing
        items = train["item_idx"].to_numpy(dtype=np.int64)
        users = train["user_id"].to_numpy()
        ts = train["timestamp"].to_numpy(dtype=np.float64)
        # Session id per event: a new session at each user change, session-id change or long gap.
        new = np.ones(len(items), dtype=bool)
        if len(items) > 1:
            new[1:] = (users[1:] != users[:-1]) | (np.diff(ts) > cfg.session_gap_hours * 3600)
            if "session_id" in train and train["session_id"].notna().any():
                sess = train["session_id"].astype(str).to_numpy()
                new[1:] |= sess[1:] != sess[:-1]
        session = np.cumsum(new)
        rows, cols, vals = [], [], []
        for d in range(1, cfg.window + 1):
            same = session[d:] == session[:-d]
            a, b = items[:-d][same], items[d:][same]
            keep = a != b
            a, b = a[keep], b[keep]
            rows += [a, b]
            cols += [b, a]
            vals += [np.full(len(a), 1.0 / d), np.full(len(a), cfg.backward_weight / d)]
        m = sp.coo_matrix((np.concatenate(vals) if vals else [], (np.concatenate(rows) if rows else [],
                           np.concatenate(cols) if cols else [])), shape=(n, n)).tocsr()
        m.sum_duplicates()
        if cfg.normalize:
            count = np.bincount(items, minlength=n).astype(np.float64)
            m = sp.diags(1.0 / np.maximum(count, 1.0) ** cfg.alpha) @ m
        self.matrix_ = m.tocsr().astype(np.float32)
        pop = item_popularity(train, n)
        # A tie-breaker far below one co-occurrence: ranks unseen pairs by popularity.
        self.prior_ = (1e-6 * pop / max(pop.max(), 1.0)).astype(np.float32)
        return self

    def score(self, histories: Sequence[np.ndarray], actions=None) -> np.ndarray:
        """[B, len(catalog)] float32: per row, sum over the latest `last_n` positive items (each distinct item once,
        its decay weights summed) of weight x the item's matrix row, plus the popularity prior. The rows are added
        straight from the CSR arrays in ascending item order, the order (and float32 arithmetic) of a sparse query
        times the matrix, without building one: a request's few items cost more in scipy's set-up than in the
        sum (`tests/test_cooccurrence.py` checks that the two agree)."""
        cfg = self.cfg
        m = self.matrix_
        indptr, indices, data = m.indptr, m.indices, m.data
        out = np.zeros((len(histories), len(self.catalog)), dtype=np.float32)
        for b, h in enumerate(histories):
            h = np.asarray(h, dtype=np.int64)
            if actions is not None and actions[b] is not None:
                h = h[positive_mask(np.asarray(actions[b], dtype=object))]
            last = h[::-1][: cfg.last_n]
            if not len(last):
                continue
            items, where = np.unique(last, return_inverse=True)
            weights = np.zeros(len(items), dtype=np.float32)
            np.add.at(weights, where, (cfg.decay ** np.arange(len(last))).astype(np.float32))
            row = out[b]
            for item, w in zip(items.tolist(), weights):
                lo, hi = indptr[item], indptr[item + 1]
                row[indices[lo:hi]] += w * data[lo:hi]
        out += self.prior_[None, :]
        return out
