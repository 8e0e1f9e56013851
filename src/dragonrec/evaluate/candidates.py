"""Candidate recall: how often each candidate source, and their union, proposes the item the user took next.

    report = candidate_recall(pipeline, split.test, ks=(50, 100, 200))
    report["sources"]["dense"]["recall@100"], report["union"]["recall@100"], report["union_configured"]

A source's recall@K is the share of cases whose target is among its first K candidates (history excluded
when the pipeline excludes it). The union is measured two ways: at each total size K, with the configured
quotas scaled proportionally to sum to K (so it is comparable with a single source at K), and at the
configured quotas themselves. Dedup makes a union hold fewer than its total: the mean distinct size is
reported beside each recall. Cases whose history gives a source nothing (a cold user) count as misses for
that source; the pipeline itself would answer them with its cold-start list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dragonrec.candidates.sources import CandidateSource, union_candidates
from dragonrec.data.splits import EvalCases
from dragonrec.pipeline import Pipeline


def scale_quotas(quotas: Mapping[str, int], total: int) -> dict[str, int]:
    """Quotas in the same proportions summing to `total` (largest remainder; every source keeps >= 1)."""
    names = list(quotas)
    w = np.asarray([quotas[s] for s in names], dtype=np.float64)
    raw = w / w.sum() * total
    out = np.floor(raw).astype(np.int64)
    left = int(total - out.sum())
    out[np.argsort(-(raw - out), kind="stable")[:left]] += 1
    return {s: max(1, int(q)) for s, q in zip(names, out)}


def candidate_recall(pipeline_or_sources: Pipeline | Mapping[str, CandidateSource], cases: EvalCases,
                     ks: Sequence[int] = (50, 100, 200), quotas: Mapping[str, int] | None = None,
                     exclude_history: bool = True, batch_size: int = 1024) -> dict:
    """Recall@K per source and for the union (see the module doc) over `cases`.

    `pipeline_or_sources`: a fitted Pipeline (its sources, quotas and exclude_history are used) or fitted
    CandidateSources by name (with `quotas`, default equal). Returns {"cases", "sources": {name: {"recall@K"}},
    "union": {"recall@K", "size@K", "quotas@K"}, "union_configured": {"quotas", "total", "recall", "size"}}.
    """
    if isinstance(pipeline_or_sources, Pipeline):
        sources = pipeline_or_sources.sources
        quotas = dict(quotas or pipeline_or_sources.cfg.sources)
        exclude_history = pipeline_or_sources.cfg.exclude_history
    else:
        sources = dict(pipeline_or_sources)
        quotas = dict(quotas or {s: 100 for s in sources})
    quotas = {s: q for s, q in quotas.items() if s in sources}
    ks = sorted({int(k) for k in ks})
    scaled = {k: scale_quotas(quotas, k) for k in ks}
    depth = {s: max([max(ks), quotas[s]] + [q[s] for q in scaled.values()]) for s in quotas}
    pos: dict[str, list[np.ndarray]] = {s: [] for s in quotas}
    sizes: dict[int | str, list[np.ndarray]] = {k: [] for k in [*ks, "configured"]}
    for start in range(0, len(cases), batch_size):
        hist = cases.histories[start:start + batch_size]
        acts = cases.actions[start:start + batch_size]
        tgt = np.asarray(cases.targets[start:start + batch_size], dtype=np.int64)
        excl = list(hist) if exclude_history else None
        found = {s: sources[s].candidates(hist, acts, depth[s], excl) for s in quotas}
        for s, c in found.items():
            hit = c.items == tgt[:, None]
            pos[s].append(np.where(hit.any(axis=1), hit.argmax(axis=1), depth[s]))
        for key, q in [*scaled.items(), ("configured", quotas)]:
            u = union_candidates(found, q)
            sizes[key].append((u.items >= 0).sum(axis=1))
    p = {s: np.concatenate(v) if v else np.zeros(0, np.int64) for s, v in pos.items()}
    n = len(cases)

    def share(mask: np.ndarray) -> float:
        return float(mask.mean()) if n else 0.0

    def union_hits(q: Mapping[str, int]) -> np.ndarray:
        return np.logical_or.reduce([p[s] < q[s] for s in q]) if q else np.zeros(n, dtype=bool)

    def mean_size(key) -> float:
        return float(np.concatenate(sizes[key]).mean()) if n else 0.0

    return {
        "cases": n,
        "sources": {s: {f"recall@{k}": share(p[s] < k) for k in ks} for s in quotas},
        "union": {**{f"recall@{k}": share(union_hits(scaled[k])) for k in ks},
                  **{f"size@{k}": mean_size(k) for k in ks},
                  **{f"quotas@{k}": scaled[k] for k in ks}},
        "union_configured": {"quotas": quotas, "total": sum(quotas.values()),
                             "recall": share(union_hits(quotas)), "size": mean_size("configured")},
    }


__all__ = ["candidate_recall", "scale_quotas"]
