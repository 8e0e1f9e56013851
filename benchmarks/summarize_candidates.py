"""Markdown tables of candidate recall and pipeline metrics from bench_candidates.py's JSON files.

    .venv/bin/python benchmarks/summarize_candidates.py benchmarks/results/candidates_beauty.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    for path in paths:
        rep = json.loads(Path(path).read_text())
        rec, ks = rep["recall"], rep["args"]["ks"]
        ties = rep["args"].get("ties", "keep")
        print(f"Candidate recall, ties {ties} ({rec['cases']} test cases, `{path}`):\n")
        print("| source | " + " | ".join(f"recall@{k}" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for name, r in rec["sources"].items():
            label = "model (the generative model's own top K)" if name == "model" else name
            print(f"| {label} | " + " | ".join(f"{r[f'recall@{k}']:.4f}" for k in ks) + " |")
        u = rec["union"]
        print("| union, quotas scaled to K | " + " | ".join(
            f"{u[f'recall@{k}']:.4f} ({u[f'size@{k}']:.0f} distinct)" for k in ks) + " |")
        c = rec["union_configured"]
        print(f"\nThe union at its configured quotas {c['quotas']} ({c['total']} proposed, {c['size']:.0f} distinct "
              f"on average): recall {c['recall']:.4f}.\n")
        print(f"Full ranking through the pipeline, ties {ties}:\n")
        print("| configuration | test NDCG@10 | test HR@10 | NDCG@5 | HR@20 | same-day NDCG@10 | fit + rank |")
        print("|---|---|---|---|---|---|---|")
        for label, res in (rep.get("pipelines") or {}).items():
            t = res["test"]
            secs = f"{res['seconds']} s" if "seconds" in res else ""
            print(f"| {label} | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} | {t['ndcg@5']:.4f} | {t['hr@20']:.4f} | "
                  f"{t.get('same_day_ndcg@10', float('nan')):.4f} | {secs} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
