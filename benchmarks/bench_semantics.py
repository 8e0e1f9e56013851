"""How many leave-one-out and time-split targets the event-semantics table changes on the typed public logs.

    python benchmarks/bench_semantics.py ../shared/data/rees46-multicat-head ../shared/data/taobao-userbehavior-slice

The old rule took the user's last event (any action) as the test target and the one before it for validation;
the new one takes the last two positive events (`dragonrec.schema.ACTION_MEANING`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dragonrec.data import leave_one_out, load_dataset, time_split
from dragonrec.schema import POSITIVE_ACTIONS, positive_mask


def old_loo_targets(events) -> dict[str, int]:
    """user -> item index of their last event, for users with at least 3 events (the old rule)."""
    g = events.groupby("user_id", sort=False)
    last = g.tail(1).set_index("user_id")["item_idx"]
    n = g.size()
    return last[n[n >= 3].index].to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--output")
    args = ap.parse_args()
    out = {}
    for path in args.datasets:
        ds = load_dataset(path)
        ev = ds.events
        counts = ev["action"].value_counts().to_dict()
        sp = leave_one_out(ev)
        new = dict(zip(sp.test.user_ids, sp.test.targets.tolist()))
        old = old_loo_targets(ev)
        changed = sum(1 for u, t in new.items() if old.get(u) != t)
        ts = time_split(ev)
        out[ds.name] = {
            "events": len(ev), "actions": counts,
            "non_positive_events": int((~positive_mask(ev["action"].to_numpy())).sum()),
            "loo_test_cases": len(sp.test), "loo_cases_old_rule": len(old),
            "loo_targets_changed": changed,
            "loo_users_dropped_or_added": len(set(old) ^ set(new)),
            "time_test_cases": len(ts.test),
            "positive_actions": sorted(POSITIVE_ACTIONS & set(counts)),
            "share_test_target_purchase": float(np.mean(sp.test.target_actions == "purchase")),
        }
        print(ds.name, json.dumps(out[ds.name]))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
