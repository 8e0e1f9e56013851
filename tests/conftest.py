"""Shared fixtures: tiny datasets with an obvious answer, and the path of the real public data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def chain_events(n_users: int = 60, n_items: int = 12, length: int = 6, seed: int = 0) -> pd.DataFrame:
    """Every user walks a fixed cycle item_k -> item_{k+1} from a random start: the next item is obvious."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(n_items))
        for t in range(length):
            rows.append({"user_id": f"u{u:03d}", "item_id": f"i{(start + t) % n_items:02d}", "action": "purchase",
                         "timestamp": 1_000_000 + 3600 * t, "seq_idx": t})
    return pd.DataFrame(rows)


def chain_items(n_items: int = 12) -> pd.DataFrame:
    cats = ["Beauty > Skin", "Beauty > Hair", "Beauty > Nails"]
    return pd.DataFrame({
        "item_id": [f"i{k:02d}" for k in range(n_items)],
        "title": [f"Product number {k}" for k in range(n_items)],
        "brand": ["acme" if k % 2 else "zenith" for k in range(n_items)],
        "category": [cats[k % 3] for k in range(n_items)],
        "price": [10.0 + k for k in range(n_items)],
    })


@pytest.fixture
def chain_dir(tmp_path: Path) -> Path:
    """A dataset directory (parquet) holding the chain catalog and events."""
    d = tmp_path / "chain"
    d.mkdir()
    chain_items().to_parquet(d / "items.parquet")
    chain_events().to_parquet(d / "interactions.parquet")
    return d


@pytest.fixture
def chain_dataset(chain_dir: Path):
    from dragonrec.data import load_dataset

    return load_dataset(chain_dir)


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return path


def beauty_first_users_events(n_users: int):
    """The events of Amazon Beauty's first `n_users` users over the catalog of the items they touched
    (item_idx re-indexed to it), in memory: (catalog, events)."""
    from dragonrec.data import Catalog, load_dataset

    ds = load_dataset(shared_dataset("amazon-beauty"))
    users = ds.events["user_id"].drop_duplicates().iloc[:n_users]
    events = ds.events[ds.events["user_id"].isin(users)].reset_index(drop=True)
    catalog = Catalog(ds.catalog.items[ds.catalog.items["item_id"].isin(set(events["item_id"]))])
    events["item_idx"] = catalog.indices(events["item_id"])
    return catalog, events


def beauty_first_users(tmp_path_factory, n_users: int):
    """The first `n_users` users of Amazon Beauty (5-core), the catalog cut to the items they touched, as a
    dataset and its leave-one-out split."""
    from dragonrec.data import leave_one_out, load_dataset

    src = shared_dataset("amazon-beauty")
    events = pd.read_parquet(src / "interactions.parquet")
    events = events[events["user_id"].isin(set(events["user_id"].drop_duplicates().iloc[:n_users]))]
    items = pd.read_parquet(src / "items.parquet")
    d = tmp_path_factory.mktemp(f"beauty{n_users}")
    items[items["item_id"].isin(set(events["item_id"]))].to_parquet(d / "items.parquet")
    events.to_parquet(d / "interactions.parquet")
    ds = load_dataset(d)
    return ds, leave_one_out(ds.events)
