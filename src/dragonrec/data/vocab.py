"""Model item ids, assigned from training data only and in random order (never in sequence order).

P5 numbered items in order of first appearance, which made a user's test item often "max id + 1". Here
an item that appears only in validation or test gets no id, and ids are a seeded random permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ItemVocab:
    """Maps catalog indices to model ids 0..n-1 (for items seen in training) and back."""

    catalog_index: np.ndarray  # [n_model_items] catalog index of model id i
    n_catalog: int
    model_id: np.ndarray = field(init=False, repr=False)  # [n_catalog] model id per catalog item, -1 if unseen

    def __post_init__(self) -> None:
        self.catalog_index = np.asarray(self.catalog_index, dtype=np.int64)
        self.model_id = np.full(self.n_catalog, -1, dtype=np.int64)
        self.model_id[self.catalog_index] = np.arange(len(self.catalog_index))

    @classmethod
    def from_train(cls, train_item_idx: np.ndarray, n_catalog: int, seed: int = 0) -> ItemVocab:
        seen = np.unique(np.asarray(train_item_idx, dtype=np.int64))
        order = np.random.default_rng(seed).permutation(len(seen))
        return cls(catalog_index=seen[order], n_catalog=n_catalog)

    def __len__(self) -> int:
        return len(self.catalog_index)

    def encode(self, catalog_idx: np.ndarray) -> np.ndarray:
        """Model ids of catalog items (-1 for items unknown to the model)."""
        return self.model_id[np.asarray(catalog_idx, dtype=np.int64)]

    def to_dict(self) -> dict:
        return {"catalog_index": self.catalog_index.tolist(), "n_catalog": self.n_catalog}

    @classmethod
    def from_dict(cls, d: dict) -> ItemVocab:
        return cls(catalog_index=np.asarray(d["catalog_index"], dtype=np.int64), n_catalog=int(d["n_catalog"]))
