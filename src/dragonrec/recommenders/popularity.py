"""Most-popular: every user gets the items most users showed interest in (positive events) in training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from dragonrec.data.catalog import Catalog
from dragonrec.data.stats import item_popularity
from dragonrec.recommenders.base import Recommender


class PopularityConfig(BaseModel):
    distinct_users: bool = Field(True, description="count each user once per item (else every event counts)")
    half_life_days: float | None = Field(None, description="weight recent events more; None = all equal")


class PopularityRecommender(Recommender):
    name = "popularity"

    def __init__(self, cfg: PopularityConfig | None = None):
        self.cfg = cfg or PopularityConfig()

    def fit(self, train: pd.DataFrame, catalog: Catalog, valid=None) -> Self:
        self.catalog = catalog
        pop = item_popularity(train, len(catalog), self.cfg.distinct_users, self.cfg.half_life_days)
        self.scores_ = np.log1p(pop).astype(np.float32)
        return self

    def score(self, histories: Sequence[np.ndarray], actions=None) -> np.ndarray:
        return np.broadcast_to(self.scores_, (len(histories), len(self.scores_))).copy()
