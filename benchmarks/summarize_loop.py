"""Markdown tables from bench_loop.py's results: per method and round, the simulated reward per impression
paired against the static model (same seed, round, users and draws), held-out NDCG@10 and the
beyond-accuracy numbers; and how the gate's off-policy estimates compare with what the versions then earned.

    .venv/bin/python benchmarks/summarize_loop.py benchmarks/results/loop_beauty.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def fmt(v: np.ndarray, d: int = 4, sign: bool = False) -> str:
    s = f"{v.mean():+.{d}f}" if sign else f"{v.mean():.{d}f}"
    return f"{s} ± {v.std(ddof=1):.{d}f}" if len(v) > 1 else s


def main(path: str) -> None:
    r = json.loads(Path(path).read_text())
    runs = r["runs"]
    methods = [m for m in r["args"]["methods"] if all(m in runs[s] for s in runs)]
    seeds = list(runs)
    rounds = r["args"]["rounds"]

    def col(m, key, rr):
        return np.array([runs[s][m]["rounds"][rr][key] for s in seeds], dtype=float)

    print(f"{len(seeds)} seeds; mean ± std over seeds\n")
    print("| method | reward / impression - static, rounds 1..5 (paired) | round 5 NDCG@10 | HR@10 | coverage@10 "
          "| ILD@10 (text) | top-1% share | promoted rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for m in methods:
        diffs = [col(m, "reward_per_impression", rr) - col("static", "reward_per_impression", rr)
                 for rr in range(1, rounds + 1)]
        per_round = ", ".join(f"{d.mean():+.4f}" for d in diffs)
        st = Counter(row.get("status") for s in seeds for row in runs[s][m]["rounds"][1:])
        promoted = f"{st.get('promoted', 0)} of {len(seeds) * rounds}" if m != "static" else ""
        print(f"| {m} | {per_round} | {fmt(col(m, 'ndcg@10', rounds))} | {fmt(col(m, 'hr@10', rounds))} | "
              f"{fmt(col(m, 'coverage@10', rounds))} | {fmt(col(m, 'ild_embedding@10', rounds), 3)} | "
              f"{fmt(col(m, 'top1pct_share@10', rounds), 3)} | {promoted} |")
    print("\nper round (mean of seeds): coverage@10 / ILD@10 (text) / top-1 % share\n")
    print("| method | " + " | ".join(f"round {rr}" for rr in range(rounds + 1)) + " |")
    print("|---|" + "---|" * (rounds + 1))
    for m in methods:
        cells = [f"{col(m, 'coverage@10', rr).mean():.3f} / {col(m, 'ild_embedding@10', rr).mean():.3f} / "
                 f"{col(m, 'top1pct_share@10', rr).mean():.3f}" for rr in range(rounds + 1)]
        print(f"| {m} | " + " | ".join(cells) + " |")
    base = [col("static", k, 0) for k in ("reward_per_impression", "ndcg@10")]
    print(f"\nround 0 (every method): reward / impression {fmt(base[0])}, NDCG@10 {fmt(base[1])}")
    five = {m: col(m, "reward_per_impression", rounds) - col("static", "reward_per_impression", rounds)
            for m in methods}
    static5 = col("static", "reward_per_impression", rounds)
    print("round-5 relative change of reward per impression vs static: " + ", ".join(
        f"{m} {100 * (five[m] / np.abs(static5)).mean():+.2f} %" for m in methods if m != "static"))

    rows = [row["ope"] for s in seeds for m in methods for row in runs[s][m]["rounds"] if row.get("ope")]
    if rows:
        est = np.array([o["snips"] - o["active_snips"] for o in rows])
        real = np.array([o["candidate_real_per_slot"] - o["active_real_per_slot"] for o in rows])
        ok = np.isfinite(est)
        print(f"\noff-policy (SNIPS per slot) over {len(rows)} gated candidates ({ok.sum()} estimable):")
        print(f"- candidate: mean |estimate - real| {np.mean(np.abs([o['snips'] - o['candidate_real_per_slot'] for o in rows if np.isfinite(o['snips'])])):.4f}, "
              f"median ESS {np.median([o['ess'] for o in rows]):.0f}")
        print(f"- active: mean |estimate - real| {np.mean(np.abs([o['active_snips'] - o['active_real_per_slot'] for o in rows if np.isfinite(o['active_snips'])])):.4f}, "
              f"median ESS {np.median([o['active_ess'] for o in rows]):.0f}")
        print(f"- estimated gain vs real gain: sign agreement {np.mean(np.sign(est[ok]) == np.sign(real[ok])):.2f}, "
              f"correlation {np.corrcoef(est[ok], real[ok])[0, 1]:.2f}; real gain > 0 in {np.mean(real > 0):.2f} of "
              f"candidates; mean estimated gain {est[ok].mean():+.4f}, mean real gain {real.mean():+.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/loop_beauty.json")
