"""The catalog: items in a fixed order, so that an item's catalog index names it in every score vector."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from dragonrec.schema import Item


@dataclass
class Catalog:
    """Items as a table (canonical columns first, extras after); row i is catalog index i.

    Every recommender scores items as a vector of length `len(catalog)` in this order.
    """

    items: pd.DataFrame
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.items = self.items.reset_index(drop=True)
        self._index = {item_id: i for i, item_id in enumerate(self.items["item_id"].tolist())}

    @classmethod
    def from_ids(cls, item_ids) -> Catalog:
        """A catalog that knows only item ids (no text), for logs that come without one."""
        ids = pd.Series(list(item_ids), dtype=object)
        return cls(pd.DataFrame({"item_id": ids.astype(str)}, dtype=object).assign(
            title=None, brand=None, category=None, price=np.nan, description=None))

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    @cached_property
    def item_ids(self) -> np.ndarray:
        return self.items["item_id"].to_numpy(dtype=object)

    def index_of(self, item_id: str) -> int:
        """The catalog index of an item; KeyError names an unknown item."""
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"unknown item {item_id!r}: not in the catalog") from None

    def indices(self, item_ids) -> np.ndarray:
        """Catalog indices of many item ids (vectorised; unknown ids raise KeyError)."""
        return np.fromiter((self.index_of(i) for i in item_ids), dtype=np.int64)

    def item(self, index: int) -> Item:
        row = self.items.iloc[int(index)]
        known = {"item_id", "title", "brand", "category", "price", "description"}

        def clean(v):
            return None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else v

        extra = {k: clean(v) for k, v in row.items() if k not in known and not isinstance(v, (list, np.ndarray))}
        return Item(
            item_id=str(row["item_id"]),
            title=clean(row.get("title")),
            brand=clean(row.get("brand")),
            category=clean(row.get("category")),
            price=clean(row.get("price")),
            description=clean(row.get("description")),
            extra=extra,
        )

    @cached_property
    def categories(self) -> np.ndarray:
        """Category path per item as a string ('' where unknown), for diversity metrics and re-ranking."""
        col = self.items["category"] if "category" in self.items else pd.Series([None] * len(self))
        return col.fillna("").astype(str).to_numpy(dtype=object)
