"""Print the issue-7 headline table (Markdown) from the reports that benchmarks/run_issue7.sh writes.

    .venv/bin/python benchmarks/summarize_issue7.py
"""

from __future__ import annotations

import json
from pathlib import Path

R = Path("runs/issue7")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def other_day(report_test: dict, same: dict, key: str) -> float:
    n, m = report_test["cases"], same["cases"]
    return (report_test[key] * n - same[key] * m) / max(n - m, 1)


def row(label: str, rep: dict | None, time_s: float | None = None) -> str:
    if rep is None:
        return f"| {label} | not run | | | | |"
    t, s = rep["test"], rep["test_slices"]["same_day"]
    time_s = rep["fit_seconds"] if time_s is None else time_s
    return (f"| {label} | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} | {s['ndcg@10']:.4f} | "
            f"{_other(t, s)} | {_duration(time_s)} |")


def _other(t: dict, s: dict) -> str:
    return "(none)" if t["cases"] == s["cases"] else f"{other_day(t, s, 'ndcg@10'):.4f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main() -> None:
    print("| model, ties | test NDCG@10 | test HR@10 | same-day NDCG@10 | other-day NDCG@10 | training |")
    print("|---|---|---|---|---|---|")
    for name in ("popularity", "cooccurrence"):
        for ties in ("keep", "shuffle"):
            print(row(f"{name}, {ties}", load(R / f"beauty-{name}-{ties}.json")))
    for name, keep, shuffle in (("sasrec", "runs/sasrec-keep", "runs/sasrec-shuffle"),
                                ("generative", "runs/gen", "runs/gen-shuffle")):
        for ties, d in (("keep", keep), ("shuffle", shuffle)):
            print(row(f"{name}, {ties}", load(Path(d) / "report.json")))
    for ties, f in (("keep", "benchmarks/results/candidates_beauty.json"),
                    ("shuffle", "benchmarks/results/candidates_beauty_shuffled.json")):
        rep = load(Path(f))
        for label, res in ((rep or {}).get("pipelines") or {}).items():
            t = res["test"]
            print(f"| pipeline {label}, {ties} | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} | "
                  f"{t.get('same_day_ndcg@10', float('nan')):.4f} | | {res.get('seconds', float('nan'))} s |")
    print()
    for d in ("rees46-multicat-head", "taobao-userbehavior-slice"):
        for name in ("popularity", "cooccurrence"):
            print(row(f"{d} {name}", load(R / f"{d}-{name}.json")))
        for name in ("sasrec", "generative"):
            print(row(f"{d} {name}", load(Path(f"runs/{d}-{name}") / "report.json")))


if __name__ == "__main__":
    main()
