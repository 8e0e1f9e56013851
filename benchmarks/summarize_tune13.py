"""Issue 13's table from `benchmarks/run_issue13.sh`'s summaries: per dataset, popularity and every model with its
default and tuned configuration (test NDCG@10 / HR@10, mean ± sample std over seeds), the search's time and
its best validation score.

    .venv/bin/python benchmarks/summarize_tune13.py rees46-multicat-head ml-100k
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cell(m: dict, key: str) -> str:
    if key not in m:
        return "not run"
    v = m[key]
    return f"{v['mean']:.4f} ± {v['std']:.4f} (n={v['n']})" if v["n"] > 1 else f"{v['mean']:.4f} (n=1)"


def fit_s(m: dict) -> str:
    runs = m.get("runs") or []
    return ", ".join(f"{r['fit_seconds']:.1f}" if r["fit_seconds"] < 10 else f"{r['fit_seconds']:.0f}"
                     for r in runs) if runs else ""


def table(dataset: str) -> str:
    lines = [f"### {dataset}", "",
             "| model | configuration | test NDCG@10 | test HR@10 | fit seconds per seed | search |",
             "|---|---|---|---|---|---|"]
    pop = RESULTS / f"tune13_{dataset}_popularity.json"
    if pop.exists():
        t = json.loads(pop.read_text())["test"]
        lines.append(f"| popularity | (deterministic) | {t['ndcg@10']:.4f} | {t['hr@10']:.4f} | | |")
    for model in ("cooccurrence", "sasrec", "generative"):
        f = RESULTS / f"tune13_{dataset}_{model}.json"
        if not f.exists():
            lines.append(f"| {model} | | not run | | | |")
            continue
        d = json.loads(f.read_text())
        s = d["search"]
        if s is None:  # the defaults only (run_issue13.sh with TUNE=0)
            lines.append(f"| {model} | default | {cell(d['default'], 'test_ndcg@10')} | "
                         f"{cell(d['default'], 'test_hr@10')} | {fit_s(d['default'])} | not searched |")
            continue
        done = sum(t["state"].lower() == "complete" for t in s["trials"])
        pruned = sum(t["state"].lower() == "pruned" for t in s["trials"])
        search = (f"{len(s['trials'])} trials ({done} complete, {pruned} pruned) in {s['seconds'] / 60:.1f} min, "
                  f"chosen: trial {s['best_trial']}, valid {s['best_value']:.4f}")
        g = s.get("guard") or {}
        if g:
            search += (f"; best trial's gain over the default {g['gain']:+.4f} ± {g['se']:.4f} "
                       f"({'default kept' if g['kept_default'] else 'taken'})")
        lines.append(f"| {model} | default | {cell(d['default'], 'test_ndcg@10')} | {cell(d['default'], 'test_hr@10')} "
                     f"| {fit_s(d['default'])} | |")
        lines.append(f"| {model} | tuned: {json.dumps(s['best_params'])} | {cell(d['tuned'], 'test_ndcg@10')} | "
                     f"{cell(d['tuned'], 'test_hr@10')} | {fit_s(d['tuned'])} | {search} |")
    for f in sorted(RESULTS.glob(f"tune13_{dataset}_*_*.json")):  # variants: tune13_<dataset>_<model>_<variant>
        model, variant = f.stem.removeprefix(f"tune13_{dataset}_").split("_", 1)
        d = json.loads(f.read_text())
        lines.append(f"| {model} | {variant.replace('_', ' ')} | {cell(d['default'], 'test_ndcg@10')} | "
                     f"{cell(d['default'], 'test_hr@10')} | {fit_s(d['default'])} | not searched |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(table(d) for d in sys.argv[1:]))
