"""Reading catalogs and event logs, validating them, and splitting them by time."""

from dragonrec.data.catalog import Catalog
from dragonrec.data.readers import (
    DataError,
    Dataset,
    ReadReport,
    load_dataset,
    load_events,
    load_feedback_log,
    load_items,
)
from dragonrec.data.splits import (
    EvalCases,
    Split,
    cold_item_split,
    cold_user_mask,
    leave_one_out,
    same_day_mask,
    shuffle_ties,
    time_split,
)
from dragonrec.data.vocab import ItemVocab

__all__ = [
    "Catalog",
    "DataError",
    "Dataset",
    "EvalCases",
    "ItemVocab",
    "ReadReport",
    "Split",
    "cold_item_split",
    "cold_user_mask",
    "leave_one_out",
    "load_dataset",
    "load_events",
    "load_feedback_log",
    "load_items",
    "same_day_mask",
    "shuffle_ties",
    "time_split",
]
