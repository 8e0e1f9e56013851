"""Cross-category recall of the complements source against co-occurrence and popularity, on leave-one-out
test cases (history excluded), plus examples of mined "goes with" pairs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_complements.py \
        --out benchmarks/results/complements.json

Cross-category cases: the test target's category (top level below the catalog-wide root, as the complements
source cuts it) differs from that of the user's last positive history item, both known. Recall@K = share of
those cases whose target is in a source's top K. "co-occurrence + complements" is the union of
co-occurrence's first K - K/5 and the complements' first K/5 candidates (at most K items), against
co-occurrence's own top K: what giving a fifth of the slots to complements buys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dragonrec.candidates.complements import ComplementsConfig, ComplementsSource, category_keys
from dragonrec.candidates.dense import Candidates
from dragonrec.candidates.sources import CandidateSource, ModelSource, PopularitySource, union_candidates
from dragonrec.data import leave_one_out, load_dataset
from dragonrec.data.splits import EvalCases
from dragonrec.recommenders.cooccurrence import CooccurrenceRecommender
from dragonrec.schema import positive_mask


def last_positive(cases: EvalCases) -> np.ndarray:
    """[n] the latest positive history item of each case (-1: none)."""
    out = np.full(len(cases), -1, dtype=np.int64)
    for i, (h, a) in enumerate(zip(cases.histories, cases.actions)):
        pos = np.flatnonzero(positive_mask(np.asarray(a, dtype=object)))
        if len(pos):
            out[i] = h[pos[-1]]
    return out


def top(src: CandidateSource, cases: EvalCases, k: int, batch: int = 2048) -> Candidates:
    """The source's top k per case, history excluded, in batches."""
    parts = []
    for s in range(0, len(cases), batch):
        h, a = cases.histories[s:s + batch], cases.actions[s:s + batch]
        parts.append(src.candidates(h, a, k=k, exclude=h))
    return Candidates(np.concatenate([p.items for p in parts]), np.concatenate([p.scores for p in parts]))


def recall(items: np.ndarray, targets: np.ndarray, k: int) -> float:
    return float((items[:, :k] == targets[:, None]).any(axis=1).mean()) if len(targets) else float("nan")


def run(data: str, variants: dict[str, ComplementsConfig], ks=(10, 50), min_positives: int = 3) -> dict:
    t0 = time.perf_counter()
    ds = load_dataset(data)
    split = leave_one_out(ds.events, min_positives=min_positives)
    cases, catalog = split.test, ds.catalog
    cats = category_keys(catalog, level=1)
    last = last_positive(cases)
    known = (last >= 0) & (cats[np.maximum(last, 0)] != "") & (cats[cases.targets] != "")
    cross = known & (cats[np.maximum(last, 0)] != cats[cases.targets])
    kmax = max(ks)
    lists: dict[str, np.ndarray] = {}
    fitted: dict[str, ComplementsSource] = {}
    for label, cfg in variants.items():
        fitted[label] = ComplementsSource(cfg).fit(split.train, catalog)
        lists[f"complements [{label}]"] = top(fitted[label], cases, kmax).items
    cooc = ModelSource(CooccurrenceRecommender().fit(split.train, catalog), name="cooccurrence").fit(split.train,
                                                                                                      catalog)
    co = top(cooc, cases, kmax)
    lists["cooccurrence"] = co.items
    lists["popularity"] = top(PopularitySource().fit(split.train, catalog), cases, kmax).items
    main = next(iter(variants))
    comp = Candidates(lists[f"complements [{main}]"], np.zeros_like(lists[f"complements [{main}]"], np.float32))
    for k in ks:  # a fifth of the k slots to complements, the rest to co-occurrence (the union holds <= k)
        u = union_candidates({"cooccurrence": co, "complements": comp}, {"cooccurrence": k - k // 5,
                                                                          "complements": k // 5})
        lists[f"cooccurrence + complements@{k}"] = u.items[:, :k]
    rows = {}
    for label, items in lists.items():
        mine = [k for k in ks if label.endswith(f"@{k}")] or list(ks)
        rows[label] = {"cross_category": {f"recall@{k}": recall(items[cross], cases.targets[cross], k) for k in mine},
                       "all_cases": {f"recall@{k}": recall(items, cases.targets, k) for k in mine},
                       "answered": float((items[:, 0] >= 0).mean())}
    links = {label: {"links": int(s.links.nnz), "anchors": int((np.diff(s.links.indptr) > 0).sum()),
                     "baskets": s.baskets} for label, s in fitted.items()}
    return {"data": data, "cases": len(cases), "cross_category_cases": int(cross.sum()),
            "known_category_cases": int(known.sum()), "rows": rows, "links": links,
            "examples": examples(fitted[main], catalog), "seconds": round(time.perf_counter() - t0, 1),
            "variants": {k: v.model_dump() for k, v in variants.items()}}


def examples(src: ComplementsSource, catalog, n: int = 6) -> list[dict]:
    """The best-supported links of the most bought anchors: one per anchor, with titles."""
    out = []
    title = catalog.items["title"].fillna("").astype(str).to_numpy()
    brand = catalog.items["brand"].fillna("").astype(str).to_numpy()
    for a in np.argsort(-src.item_users, kind="stable"):
        items, _ = src.goes_with(int(a), n=1)
        if not len(items):
            continue
        b = int(items[0])
        e = src.explain(int(a), b)
        out.append({"a": f"{catalog.item_ids[a]} {title[a][:70] or brand[a]}",
                    "b": f"{catalog.item_ids[b]} {title[b][:70] or brand[b]}",
                    **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in e.items()}})
        if len(out) == n:
            break
    return out


def print_table(name: str, r: dict) -> None:
    print(f"\n{name}: {r['cross_category_cases']} cross-category test cases of {r['cases']} "
          f"({r['known_category_cases']} with both categories known)")
    print("| source | cross recall@10 | cross recall@50 | all recall@10 | all recall@50 | answered |")
    print("|---|---|---|---|---|---|")
    for label, row in r["rows"].items():
        def cell(part, k, row=row):
            v = row[part].get(f"recall@{k}")
            return "" if v is None else f"{v:.4f}"
        print(f"| {label} | {cell('cross_category', 10)} | {cell('cross_category', 50)} | {cell('all_cases', 10)} | "
              f"{cell('all_cases', 50)} | {row['answered']:.3f} |")
    for label, info in r["links"].items():
        print(f"links [{label}]: {info}")
    for e in r["examples"]:
        print(f"  {e['a']}  ->  {e['b']}  (support {e['support']}, users {e['users_a']}/{e['users_b']}, "
              f"lift {e['lift']}, {e['category_a']} -> {e['category_b']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beauty", default="../shared/data/amazon-beauty")
    ap.add_argument("--rees46", default="../shared/data/rees46-multicat-head")
    ap.add_argument("--out", default="benchmarks/results/complements.json")
    args = ap.parse_args()
    report = {"command": " ".join(["benchmarks/bench_complements.py", *sys.argv[1:]])}
    base = ComplementsConfig()
    report["beauty"] = run(args.beauty, {
        "default: 72 h, min_support 2, lift_lcb": base,
        "30 days": base.model_copy(update={"window_hours": 24 * 30}),
        "30 days, lift": base.model_copy(update={"window_hours": 24 * 30, "measure": "lift"}),
        "30 days, confidence": base.model_copy(update={"window_hours": 24 * 30, "measure": "confidence",
                                                       "min_lift": 0.0}),
        "30 days, same category allowed": base.model_copy(update={"window_hours": 24 * 30, "cross_category": False}),
    })
    print_table("amazon-beauty", report["beauty"])
    views = {"view": 0.2, "add_to_cart": 0.7, "purchase": 1.0}
    report["rees46"] = run(args.rees46, {
        "carts+purchases, min_support 1": base.model_copy(update={"min_support": 1}),
        "views too (schema strengths), min_support 1": base.model_copy(update={"min_support": 1,
                                                                               "action_weights": views}),
        "views too, uncategorised links kept": base.model_copy(update={"min_support": 1, "action_weights": views,
                                                                       "uncategorised_links": True}),
    })
    print_table("rees46-multicat-head", report["rees46"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
