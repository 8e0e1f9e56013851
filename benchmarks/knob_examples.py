"""A merchant's view of the re-rank knobs: for a few real Amazon Beauty shoppers, the top 10 before and after each
knob (diversity, DPP, category cap, calibration, price and category filters, exclusions, complements), each item
with its reason, written as markdown between the markers in docs/diversity.md.

    flock /tmp/dragonrec-cpu.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/knob_examples.py \
        --data ../shared/data/amazon-beauty --doc docs/diversity.md

The pipeline is the one the shop serves without a model version: dense retrieval + co-occurrence + popularity
candidates in fused retrieval order (reciprocal-rank fusion), fitted on every event; each shopper's whole history
is the request's history (history items are never recommended).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragonrec.candidates.sources import DenseConfig
from dragonrec.data import load_dataset
from dragonrec.pipeline import Pipeline, PipelineConfig
from dragonrec.rerank import RerankConfig

# Shoppers with 8-12 reviews over at least three second-level categories (the 11th, 501st and 1501st such
# user id in sorted order): histories long enough to show interests, short enough to read.
USERS = ("A102JNFLL0KW7I", "A1D590PXKW4I22", "A22T0TRQT9WE14")
BEGIN, END = "<!-- knob examples: begin (benchmarks/knob_examples.py) -->", "<!-- knob examples: end -->"


def knobs(top3: list[str]) -> dict[str, tuple[str, dict]]:
    """name -> (pipeline: "base" or "complements", request context)."""
    return {
        "diversity 0 (relevance order)": ("base", {}),
        "diversity 0.3 (MMR)": ("base", {"diversity": 0.3}),
        "diversity 0.3, DPP mode": ("dpp", {"diversity": 0.3}),
        "category cap 2": ("cap", {}),
        "calibration 1.0": ("calibration", {}),
        "filter: price <= $15": ("base", {"filters": {"max_price": 15}}),
        "filter: category 'hair care'": ("base", {"filters": {"categories": ["hair care"]}}),
        "exclusions: the first three out of stock": ("base", {"exclude": top3}),
        "complements as a source": ("complements", {}),
    }


def short(text, n: int = 60) -> str:
    text = re.sub(r"\s+", " ", str(text or "")).replace("|", "/")
    return text if len(text) <= n else text[:n - 1] + "…"


def leaf(path: str) -> str:
    return short(path.split(">")[-1].strip() if path else "?", 30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--doc", default="docs/diversity.md")
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()

    ds = load_dataset(args.data)
    cat, ev = ds.catalog, ds.events
    dense = DenseConfig(cache_dir=args.cache_dir)
    quotas = {"dense": 100, "cooccurrence": 100, "popularity": 50}

    def pipeline(rerank: RerankConfig, sources: dict[str, int] = quotas) -> Pipeline:
        cfg = PipelineConfig(sources=sources, scorer="none", rest="popularity", dense=dense, rerank=rerank)
        return Pipeline(cfg).fit(ev, cat)

    base = pipeline(RerankConfig())
    pipes = {"base": base}
    for name, rc in (("dpp", RerankConfig(mode="dpp")), ("cap", RerankConfig(category_cap=2)),
                     ("calibration", RerankConfig(calibration=1.0))):
        pipes[name] = pipeline(rc)
    pipes["complements"] = pipeline(RerankConfig(), {"dense": 100, "cooccurrence": 100, "complements": 50,
                                                     "popularity": 50})
    comp = pipes["complements"].sources["complements"]
    prices = cat.items["price"].to_numpy(dtype=np.float64)

    def row(k: int, idx: int, reason: str, before: set[int]) -> str:
        price = "" if not np.isfinite(prices[idx]) else f"${prices[idx]:.2f}"
        mark = "" if idx in before else " **(new)**"
        return (f"| {k} | {short(cat.item(idx).title)}{mark} "
                f"| {leaf(cat.categories[idx])} | {price} | {short(reason, 70)} |")

    out = [BEGIN, ""]
    for user in USERS:
        rows = ev[ev["user_id"] == user]
        hist = rows["item_idx"].to_numpy(dtype=np.int64)
        acts = rows["action"].astype(str).to_numpy(dtype=object)
        out += [f"### Shopper `{user}` ({len(hist)} reviews)", "", "History, oldest first: "
                + "; ".join(f"{short(cat.item(int(i)).title, 40)} ({leaf(cat.categories[int(i)])})" for i in hist), ""]
        first = base.recommend_for(hist, acts, args.n)
        before = set(first.indices)
        top3 = first.items[:3]
        for name, (which, ctx) in knobs(top3).items():
            recs = first if name.startswith("diversity 0 ") else pipes[which].recommend_for(hist, acts, args.n, ctx)
            kept = len(before & set(recs.indices))
            cats = len({cat.categories[i] for i in recs.indices})
            out += [f"**{name}**: {kept} of the first list's {args.n} kept, {cats} categories", "",
                    "| # | item | category | price | reason |", "|---|---|---|---|---|"]
            out += [row(k + 1, r.idx, r.reason, before) for k, r in enumerate(recs)]
            out.append("")
        last = int(hist[-1])
        items, scores = comp.goes_with(last, n=5, exclude=hist)
        out += [f"**\"Goes with\" slot on the page of {short(cat.item(last).title, 50)}** (complements by lift):", ""]
        if len(items):
            out += ["| # | item | category | users | lift |", "|---|---|---|---|---|"]
            for k, (b, _) in enumerate(zip(items, scores)):
                e = comp.explain(last, int(b))
                out.append(f"| {k + 1} | {short(cat.item(int(b)).title)} | {leaf(cat.categories[int(b)])} "
                           f"| {e.get('support', '')} | {e.get('lift', float('nan')):.1f} |")
        else:
            out.append("(no complement passes the lift bound for this item)")
        out.append("")
    out.append(END)
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else f"# Diversity\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(head + "\n".join(out) + tail)
    print(f"wrote {len(USERS)} shoppers x {len(knobs([]))} knobs into {doc}")


if __name__ == "__main__":
    main()
