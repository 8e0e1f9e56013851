"""The feedback store: impressions and events in SQLite (embedded) or PostgreSQL, with import and export.

    from dragonrec.store import Store, import_file, export_events
    with Store.open("sqlite:///runs/feedback.db") as store:
        import_file(store, "feedback.jsonl")
        split = leave_one_out(export_events(store))
"""

from dragonrec.store.config import StoreConfig
from dragonrec.store.io import (
    ImportReport,
    export_dataset,
    export_events,
    export_impressions,
    import_events,
    import_feedback_log,
    import_file,
    is_feedback_log,
    write_events,
    write_feedback_log,
    write_impressions,
)
from dragonrec.store.store import Feedback, Store, StoreCounts, WriteResult
from dragonrec.store.validate import StoreError, derive_event_id

__all__ = [
    "Feedback",
    "ImportReport",
    "Store",
    "StoreConfig",
    "StoreCounts",
    "StoreError",
    "WriteResult",
    "derive_event_id",
    "export_dataset",
    "export_events",
    "export_impressions",
    "import_events",
    "import_feedback_log",
    "import_file",
    "is_feedback_log",
    "write_events",
    "write_feedback_log",
    "write_impressions",
]
