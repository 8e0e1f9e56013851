"""Provenance: which data a model saw, so that it is never evaluated on targets it trained on.

A saved model directory holds `provenance.json` (dataset fingerprint, split, seed, ties, config) and
`trained_events.npy` (a 64-bit key per event it trained or early-stopped on: every training event and every
validation target). `check_held_out` refuses a split whose test targets include any of those events, which
catches another dataset, another split (time after leave-one-out), another seed, and shuffled ties alike.

    prov = Provenance.of(dataset, split, split_name="loo", seed=0, ties="keep", config=cfg)
    prov.save(model_dir, trained_keys(split))
    check_held_out(model_dir, split)        # ProvenanceError when the model may have seen a test target
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

PROVENANCE = "provenance.json"
TRAINED_EVENTS = "trained_events.npy"


class ProvenanceError(ValueError):
    """A model and a dataset or split that must not meet: the message says why and what to do."""


def event_keys(user_ids, item_ids, timestamps) -> np.ndarray:
    """[n] uint64: one key per (user, item, timestamp) event, the identity of an event across splits."""
    frame = pd.DataFrame({"u": np.asarray(user_ids, dtype=object).astype(str),
                          "i": np.asarray(item_ids, dtype=object).astype(str),
                          "t": np.round(np.asarray(timestamps, dtype=np.float64), 3)})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def dataset_fingerprint(events: pd.DataFrame, catalog_ids) -> str:
    """sha256 over every event (user, item, action, time) in order and the catalog's item ids."""
    h = hashlib.sha256()
    keys = event_keys(events["user_id"], events["item_id"], events["timestamp"])
    h.update(keys.tobytes())
    h.update("\x1f".join(events["action"].astype(str)).encode())
    h.update("\n".join(map(str, catalog_ids)).encode())
    return h.hexdigest()


def trained_keys(split, catalog_ids) -> np.ndarray:
    """Sorted unique keys of every event a model fitted on `split` may have learned from: the training
    events and the validation targets (early stopping and refits use them)."""
    ids = np.asarray(catalog_ids, dtype=object)
    tr = split.train
    keys = [event_keys(tr["user_id"], tr["item_id"], tr["timestamp"])]
    v = split.valid
    if len(v) and v.target_times is not None:
        keys.append(event_keys(v.user_ids, ids[v.targets], v.target_times))
    return np.unique(np.concatenate(keys))


def target_keys(cases, catalog_ids) -> np.ndarray:
    if cases.target_times is None:
        raise ProvenanceError("these evaluation cases carry no target times: cannot check them against the model")
    return event_keys(cases.user_ids, np.asarray(catalog_ids, dtype=object)[cases.targets], cases.target_times)


class Provenance(BaseModel):
    """What a saved model was made from."""

    model_config = ConfigDict(extra="forbid")

    dataset: str  # dataset name
    dataset_sha256: str  # `dataset_fingerprint` of the events (after tie handling) and catalog
    n_events: int  # events in the dataset
    split: str  # loo, time or cold-item
    ties: str = "keep"  # keep (the file's within-timestamp order) or shuffle (seeded)
    seed: int = 0  # seed of the split, the ties and the model
    train_events: int = 0  # events trained on
    config: dict = Field(default_factory=dict)  # the resolved model config

    @classmethod
    def of(cls, dataset, split, *, split_name: str, seed: int, ties: str, config: dict,
           events: pd.DataFrame | None = None) -> Provenance:
        ev = dataset.events if events is None else events
        return cls(dataset=dataset.name, dataset_sha256=dataset_fingerprint(ev, dataset.catalog.item_ids),
                   n_events=len(ev), split=split_name, ties=ties, seed=seed, train_events=len(split.train),
                   config=config)

    def save(self, directory: Path | str, keys: np.ndarray) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROVENANCE).write_text(self.model_dump_json(indent=2))
        np.save(directory / TRAINED_EVENTS, np.asarray(keys, dtype=np.uint64))

    @classmethod
    def load(cls, directory: Path | str) -> Provenance | None:
        path = Path(directory) / PROVENANCE
        if not path.exists():
            return None
        return cls.model_validate(json.loads(path.read_text()))

    def same_run(self, other: Provenance) -> bool:
        """The same data, split, ties and seed (what a resumed training run must share with its checkpoints)."""
        keys = ("dataset_sha256", "split", "ties", "seed")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def describe(self) -> str:
        return f"{self.dataset} ({self.dataset_sha256[:12]}), split {self.split}, ties {self.ties}, seed {self.seed}"


def check_held_out(model_dir: Path | str, split, catalog_ids, *, cases: str = "test") -> int:
    """Raise ProvenanceError unless none of the split's `cases` targets is an event the saved model trained
    or early-stopped on. Returns the number of targets checked."""
    model_dir = Path(model_dir)
    prov = Provenance.load(model_dir)
    keys_file = model_dir / TRAINED_EVENTS
    if prov is None or not keys_file.exists():
        raise ProvenanceError(f"{model_dir} records no provenance ({PROVENANCE}, {TRAINED_EVENTS}): it may have "
                              "been trained on these test targets, so it is not evaluated. Retrain it with "
                              "`dragonrec train sft`, which records what it saw.")
    trained = np.load(keys_file)
    tk = target_keys(getattr(split, cases), catalog_ids)
    seen = np.isin(tk, trained)
    if seen.any():
        raise ProvenanceError(
            f"{model_dir} was trained on {int(seen.sum())} of the {len(tk)} {cases} targets of this split "
            f"(model: {prov.describe()}): its {cases} numbers would not be held-out. Evaluate it on the split it "
            f"was trained for, or train a model on this one.")
    return len(tk)
