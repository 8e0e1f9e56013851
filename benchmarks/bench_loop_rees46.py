"""The feedback loop on REES46's real typed log (view, add_to_cart, purchase): no simulator, real actions.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loop_rees46.py --rounds 3 --seeds 0 1 2 \
        --out benchmarks/results/loop_rees46.json

Windows. The log (one morning, 17,434 events) is sorted by time. Nearly all of it falls in its last 40 minutes
(02:10-02:50 UTC; 00:20-02:10 holds ~200 events), so windows of equal *time* would leave rounds with ~60 events
each; with `--cut events` (the default) the boundaries are time quantiles of the events instead: the base window
holds the first `--base-frac` (40%) of the events, the rest is cut into `--rounds` round windows plus one final
evaluation window, equal in events (`--cut time` cuts the time range as given). A boundary never splits
a timestamp.

Base model. `generative` (item text: brand, category, price) trained on the base window: leave-one-out inside
the window picks the epoch count by early stopping (validation = each user's second-last positive event), the
last positive event scores the model (`base.choice_ndcg@10`: how generative was chosen over sasrec, see
`--compare-base`), then a fresh model is trained on every base-window event for that many epochs, saved, and
registered as v0001 in a fresh registry per method (`<workdir>/seed<S>/<method>/registry`), beside a fresh
SQLite store whose catalog is the item table.

Users. Per seed, `--held-out` (20%) of all users are drawn: their events never enter a store. Each round's gate
cases are theirs: the last positive event in the round's window is the target, every earlier event of theirs
(base window included) the history (users with no earlier event are left out).

A round r: the window's events of the other users go into the store (every event keeps its own id, so the 5
exact duplicates of the source stay), and their sessions become impressions: one per (user, session_id) part
inside the window, listing the distinct items the user touched in first-event order (the viewed ones: every
carted or purchased item of the log was viewed in its session first), request_id `rees46:<session>:<user>:w<r>`,
timestamp = the session part's first event; every event of the part carries that request_id, so rewards
attribute directly. Then `FeedbackLoop.run_round()`: default `RewardConfig` (view 0.2, add_to_cart 0.7,
purchase 1.0), `PreferenceConfig(rejected_positives=True)` (chosen = the carted / purchased items, rejected the
viewed-only ones of the same session, and a carted item against a purchased one), the gate on held-out NDCG@10
(`--max-ndcg-drop` 0.02 relative), `off_policy="off"`: the real log has no propensities (the store's "policy"
is the shop's own pages, unknown to us), so no off-policy estimate exists.

Measured after each round r = 0..R (0 = the base model), for each method (static = the base model, never
updated; sft, dpo, sdpo through the loop): the active version on window r+1's real events, for every user of
that window with an event before it: history = all their events before the window, target = their first
add_to_cart/purchase in the window (`buy`), and separately their first view in the window (`view`); history
items excluded from the ranking (a target already in the history is a miss; `kept` has the other variant);
slices: users held out of the stores vs the others. Also the round's status, gate numbers, records, training s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

from dragonrec.data import leave_one_out, load_dataset
from dragonrec.data.splits import EvalCases
from dragonrec.evaluate import evaluate_cases
from dragonrec.evaluate.experiment import saved_recommender_name
from dragonrec.loop import FeedbackLoop, GateConfig, LoopConfig
from dragonrec.preferences import PreferenceConfig
from dragonrec.recommenders import build, recommender_class
from dragonrec.registry import DataWindow, Registry
from dragonrec.schema import Impression, positive_mask
from dragonrec.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import method_overrides

torch.set_num_threads(1)

BUY_ACTIONS = ("add_to_cart", "purchase")
METHOD_DEFAULTS = {
    # The loop's own sft defaults (one pass, a low learning rate, from the active weights).
    "sft": {"lr": 2e-4, "max_epochs": 1},
    # A round holds ~15-25 pairs: a few passes in small batches, so DPO takes more than one step.
    "dpo": {"lr": 1e-4, "beta": 0.1, "epochs": 4, "batch_size": 8, "quiet": True},
    "sdpo": {"lr": 1e-4, "beta": 0.1, "epochs": 4, "batch_size": 8, "quiet": True},
}
BASE_MODELS = {
    "generative": {"max_epochs": 60, "max_minutes": 2.0, "eval_every": 1, "patience": 3},
    "sasrec": {"max_epochs": 60, "max_minutes": 2.0, "eval_every": 1, "patience": 3},
}


# ---------------------------------------------------------------- data


def window_edges(ts: np.ndarray, base_frac: float, rounds: int, cut: str) -> np.ndarray:
    """[rounds + 3] boundaries: base window, `rounds` round windows, one final evaluation window."""
    lo, hi = float(ts.min()), float(ts.max())
    if cut == "events":
        inner = np.quantile(ts, np.linspace(base_frac, 1.0, rounds + 2)[:-1], method="lower")
    else:
        inner = lo + (hi - lo) * np.linspace(base_frac, 1.0, rounds + 2)[:-1]
    return np.concatenate([[lo], inner, [hi + 1.0]])


def sorted_events(ev: pd.DataFrame) -> pd.DataFrame:
    return ev.sort_values(["user_id", "timestamp", "order"], kind="stable", na_position="last").reset_index(drop=True)


def cases_from_rows(ev: pd.DataFrame, rows: list[tuple[str, int, int]]) -> EvalCases:
    """EvalCases from (user, first row, target row) over `ev` (sorted by user, time)."""
    items = ev["item_idx"].to_numpy(np.int64)
    acts = ev["action"].to_numpy(dtype=object)
    ts = ev["timestamp"].to_numpy(np.float64)
    return EvalCases(np.asarray([u for u, _, _ in rows], dtype=object), [items[s:t] for _, s, t in rows],
                     [acts[s:t] for _, s, t in rows], np.asarray([items[t] for _, _, t in rows], dtype=np.int64),
                     np.asarray([acts[t] for _, _, t in rows], dtype=object),
                     np.asarray([ts[t] for _, _, t in rows], dtype=np.float64),
                     np.asarray([ts[t - 1] for _, s, t in rows], dtype=np.float64))


def user_blocks(ev: pd.DataFrame):
    users = ev["user_id"].to_numpy()
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], cuts]).astype(np.int64)
    ends = np.concatenate([cuts, [len(users)]]).astype(np.int64)
    return zip(users[starts], starts, ends)


def gate_cases(ev: pd.DataFrame, w: np.ndarray, k: int, held: set[str]) -> EvalCases:
    """Held-out users' last positive event in window k; every earlier event of theirs is the history."""
    pos = positive_mask(ev["action"].to_numpy(dtype=object))
    rows = []
    for user, s, e in user_blocks(ev):
        if user not in held:
            continue
        inside = s + np.flatnonzero((w[s:e] == k) & pos[s:e])
        if len(inside) and inside[-1] > s:
            rows.append((user, s, int(inside[-1])))
    return cases_from_rows(ev, rows)


def next_window_cases(ev: pd.DataFrame, w: np.ndarray, k: int) -> dict[str, EvalCases]:
    """Users of window k with an event before it: history = all their events before window k; targets: their
    first add_to_cart/purchase in it (`buy`) and their first view in it (`view`)."""
    acts = ev["action"].to_numpy(dtype=object)
    out: dict[str, list] = {"buy": [], "view": []}
    for user, s, e in user_blocks(ev):
        before = int((w[s:e] < k).sum())  # rows are in time order, windows too
        if before == 0:
            continue
        inside = s + np.flatnonzero(w[s:e] == k)
        if not len(inside):
            continue
        hist_end = s + before
        buys = inside[np.isin(acts[inside], BUY_ACTIONS)]
        views = inside[acts[inside] == "view"]
        if len(buys):
            out["buy"].append((user, s, hist_end, int(buys[0])))
        if len(views):
            out["view"].append((user, s, hist_end, int(views[0])))
    items = ev["item_idx"].to_numpy(np.int64)
    ts = ev["timestamp"].to_numpy(np.float64)

    def build_cases(rows):
        return EvalCases(np.asarray([r[0] for r in rows], dtype=object), [items[r[1]:r[2]] for r in rows],
                         [acts[r[1]:r[2]] for r in rows], np.asarray([items[r[3]] for r in rows], dtype=np.int64),
                         np.asarray([acts[r[3]] for r in rows], dtype=object),
                         np.asarray([ts[r[3]] for r in rows], dtype=np.float64),
                         np.asarray([ts[r[2] - 1] for r in rows], dtype=np.float64))

    return {name: build_cases(rows) for name, rows in out.items()}


def feedback_batch(win: pd.DataFrame, k: int) -> tuple[pd.DataFrame, list[Impression]]:
    """The window's events with the request_id of their session part, and one impression per session part."""
    win = win.sort_values(["timestamp", "order"], kind="stable", na_position="last")
    key = win["session_id"].astype(str) + ":" + win["user_id"].astype(str)
    rid = "rees46:" + key + f":w{k}"
    win = win.assign(request_id=rid.to_numpy())
    imps = []
    for request_id, g in win.groupby("request_id", sort=False):
        imps.append(Impression(request_id=str(request_id), user_id=str(g["user_id"].iloc[0]),
                               item_ids=[str(i) for i in pd.unique(g["item_id"])],
                               timestamp=float(g["timestamp"].iloc[0]), pipeline="rees46-site"))
    return win, imps


# ---------------------------------------------------------------- models


def fit_base(name: str, base: pd.DataFrame, catalog, seed: int, overrides: dict, cache_dir: str) -> tuple:
    """Early stopping by leave-one-out inside the base window, then a fresh model on every base event."""
    cfg = {**BASE_MODELS[name], "seed": seed, "progress": False, "quiet": True, "refit_with_valid": False,
           "text_cache_dir": cache_dir, **overrides}
    split = leave_one_out(base)
    t0 = time.time()
    probe = build(name, cfg).fit(split.train, catalog, valid=split.valid)
    choice = evaluate_cases(probe, split.test)["metrics"]
    best = max(probe.result.best_epoch, 1)
    final = build(name, {**cfg, "max_epochs": best, "max_minutes": None}).fit(base, catalog)
    info = {"model": name, "config": cfg, "best_epoch": best, "valid_ndcg@10": probe.result.best_ndcg,
            "choice_ndcg@10": choice["ndcg@10"], "choice_hr@10": choice["hr@10"], "valid_cases": len(split.valid),
            "choice_cases": len(split.test), "fit_s": round(time.time() - t0, 1)}
    return final, info


def load(path: Path, catalog):
    return recommender_class(saved_recommender_name(path)).load(path, catalog)


def measure(model, cases: dict[str, EvalCases], held: set[str]) -> dict:
    out = {}
    for name, c in cases.items():
        if not len(c):
            out[name] = {"cases": 0}
            continue
        mask = np.isin(c.user_ids, list(held))
        res = evaluate_cases(model, c, slices={"held_out_users": mask, "store_users": ~mask})
        in_hist = np.mean([t in h for t, h in zip(c.targets, c.histories)])
        out[name] = {"ndcg@10": res["metrics"]["ndcg@10"], "hr@10": res["metrics"]["hr@10"],
                     "ndcg@10_kept": res["keep_history"]["ndcg@10"], "hr@10_kept": res["keep_history"]["hr@10"],
                     "cases": len(c), "target_in_history": float(in_hist),
                     "slices": {k: {"ndcg@10": v["ndcg@10"], "hr@10": v["hr@10"], "cases": int(v.get("cases", 0))}
                                for k, v in res["slices"].items()}}
    return out


def train_seconds(train: dict) -> float | None:
    s = train.get("seconds")
    if isinstance(s, dict):
        return s.get("total")
    return s


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/rees46-multicat-head")
    ap.add_argument("--methods", nargs="+", default=["static", "sft", "dpo", "sdpo"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base-frac", type=float, default=0.4)
    ap.add_argument("--cut", choices=["events", "time"], default="events")
    ap.add_argument("--held-out", type=float, default=0.2)
    ap.add_argument("--model", choices=sorted(BASE_MODELS), default="generative")
    ap.add_argument("--compare-base", action="store_true", help="also fit the other base model (first seed)")
    ap.add_argument("--max-ndcg-drop", type=float, default=0.02)
    ap.add_argument("--min-records", type=int, default=8)
    ap.add_argument("--set", nargs="*", default=[], help="method.field=value, e.g. dpo.beta=0.5")
    ap.add_argument("--cache-dir", default=".cache/embeddings")
    ap.add_argument("--workdir", default="runs/loop_rees46")
    ap.add_argument("--out", default="benchmarks/results/loop_rees46.json")
    args = ap.parse_args()
    t_start = time.time()
    overrides = method_overrides(METHOD_DEFAULTS, args.set)

    ds = load_dataset(args.data)
    ev = sorted_events(ds.events)
    ts = ev["timestamp"].to_numpy(np.float64)
    edges = window_edges(ts, args.base_frac, args.rounds, args.cut)
    w = np.searchsorted(edges, ts, side="right") - 1  # 0 = base, 1..R rounds, R+1 final evaluation window
    sizes = np.bincount(w, minlength=len(edges) - 1).tolist()
    print(f"windows (UTC): {[pd.Timestamp(e, unit='s').strftime('%H:%M:%S') for e in edges]} events {sizes}",
          flush=True)
    base = ev[w == 0].reset_index(drop=True)
    all_users = np.sort(ev["user_id"].astype(str).unique())
    cols = ["user_id", "item_id", "action", "timestamp", "request_id", "value", "session_id", "order"]
    report: dict = {"command": " ".join(["benchmarks/bench_loop_rees46.py", *sys.argv[1:]]), "args": vars(args),
                    "method_config": overrides, "windows": {"edges": edges.tolist(), "events": sizes},
                    "base": {}, "runs": {}}
    next_cases = {k: next_window_cases(ev, w, k) for k in range(1, args.rounds + 2)}

    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        held = set(rng.choice(all_users, size=round(args.held_out * len(all_users)), replace=False).tolist())
        seed_dir = Path(args.workdir) / f"seed{seed}"
        shutil.rmtree(seed_dir, ignore_errors=True)
        seed_dir.mkdir(parents=True)
        t0 = time.time()
        model, info = fit_base(args.model, base, ds.catalog, seed, {}, args.cache_dir)
        base_dir = seed_dir / "base_model"
        model.save(base_dir)
        if args.compare_base and seed == args.seeds[0]:
            other = next(m for m in BASE_MODELS if m != args.model)
            report["base_comparison"] = {args.model: info,
                                         other: fit_base(other, base, ds.catalog, seed, {}, args.cache_dir)[1]}
        report["base"][str(seed)] = info
        print(f"seed {seed} base {args.model}: best epoch {info['best_epoch']} valid NDCG@10 "
              f"{info['valid_ndcg@10']:.4f} last-positive NDCG@10 {info['choice_ndcg@10']:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
        round0 = measure(model, next_cases[1], held)
        gates = {r: gate_cases(ev, w, r, held) for r in range(1, args.rounds + 1)}
        for method in args.methods:
            t_run = time.time()
            work = seed_dir / method
            work.mkdir(parents=True)
            reg = Registry(work / "registry")
            reg.register(base_dir, method="sft", activate=True, data_window=DataWindow.from_events("rees46-base", base),
                         metrics={"base": info}, note="base model of the REES46 loop benchmark")
            store = Store.open(work / "store.db", items=ds.catalog)
            cfg = LoopConfig(method=method if method != "static" else "sft",
                             method_config={**overrides.get(method, {}), "seed": seed},
                             min_records=args.min_records, seed=seed,
                             preference=PreferenceConfig(rejected_positives=True),
                             gate=GateConfig(max_ndcg_drop=args.max_ndcg_drop, off_policy="off"))
            active = model
            rows = [{"round": 0, "version": reg.active_version(), "status": "base", **round0}]
            for r in range(1, args.rounds + 1):
                t_round = time.time()
                row: dict = {"round": r}
                if method == "static":
                    row.update(status="static", version=reg.active_version())
                else:
                    win = ev[(w == r) & ~ev["user_id"].isin(held)]
                    win, imps = feedback_batch(win, r)
                    events = win.reindex(columns=cols).assign(event_id=[f"rees46:{i}" for i in win.index])
                    wrote = store.write(events=events, impressions=imps)
                    # A loop per round: the gate cases are this round's (the library takes them once, at init).
                    loop = FeedbackLoop(reg, store, ds.catalog, base.reindex(columns=cols), gates[r], cfg, quiet=True)
                    res = loop.run_round()
                    tr = res.train
                    row.update(status=res.status, reason=res.reason, version=res.version or reg.active_version(),
                               parent=res.parent, written={"events": wrote.events_accepted,
                                                           "impressions": wrote.impressions_accepted},
                               new_events=res.data.get("new_events"), records=res.data.get("records"),
                               train_seconds=train_seconds(tr), round_seconds=res.seconds,
                               gate={k: v for k, v in res.gate.items() if k != "reason"},
                               train={k: tr.get(k) for k in ("examples", "dropped", "steps", "margin_before",
                                                             "margin_after", "accuracy_before", "accuracy_after",
                                                             "kl_after", "sequences", "epochs") if k in tr})
                    if res.status == "promoted":
                        active = load(reg.active().path, ds.catalog)
                row.update(measure(active, next_cases[r + 1], held))
                row["seconds"] = round(time.time() - t_round, 1)
                rows.append(row)
                g = row.get("gate") or {}
                gate_txt = (f"gate {g['candidate_ndcg@10']:.4f} vs {g['active_ndcg@10']:.4f} ({g['gate_cases']} cases)"
                            if g else "")
                print(f"seed {seed} {method:6s} round {r}: {row['status']:8s} records {row.get('records')} "
                      f"buy NDCG@10 {row['buy'].get('ndcg@10', float('nan')):.4f} view NDCG@10 "
                      f"{row['view'].get('ndcg@10', float('nan')):.4f} {gate_txt} ({row['seconds']} s)", flush=True)
            store.close()
            report["runs"].setdefault(str(seed), {})[method] = {"rounds": rows, "seconds": round(time.time() - t_run, 1)}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=float))
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    report["summary"] = summarize(report, args.methods, args.rounds)
    report["total_s"] = round(time.time() - t_start, 1)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float))
    print_table(report)
    print(f"wrote {args.out} ({report['total_s']} s)")


def stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def summarize(report: dict, methods: list[str], rounds: int) -> dict:
    out = {}
    for m in methods:
        per_round = []
        for r in range(rounds + 1):
            rows = [report["runs"][s][m]["rounds"][r] for s in report["runs"] if m in report["runs"][s]]
            entry = {"status": {st: sum(x["status"] == st for x in rows) for st in sorted({x["status"] for x in rows})}}
            for target in ("buy", "view"):
                for k in ("ndcg@10", "hr@10", "ndcg@10_kept", "cases", "target_in_history"):
                    entry[f"{target}_{k}"] = stats([x[target].get(k) for x in rows])
            for k in ("records", "train_seconds"):
                entry[k] = stats([x.get(k) for x in rows])
            for k in ("margin_before", "margin_after", "accuracy_before", "accuracy_after", "kl_after"):
                entry[f"train_{k}"] = stats([(x.get("train") or {}).get(k) for x in rows])
            if "static" in methods:  # paired by seed: the same windows, users and base model
                for target in ("buy", "view"):
                    entry[f"{target}_ndcg@10_minus_static"] = stats([
                        report["runs"][s][m]["rounds"][r][target].get("ndcg@10", np.nan)
                        - report["runs"][s]["static"]["rounds"][r][target].get("ndcg@10", np.nan)
                        for s in report["runs"] if m in report["runs"][s] and "static" in report["runs"][s]])
            gates = [x["gate"] for x in rows if x.get("gate")]
            entry["gate_candidate_ndcg@10"] = stats([g["candidate_ndcg@10"] for g in gates])
            entry["gate_active_ndcg@10"] = stats([g["active_ndcg@10"] for g in gates])
            entry["gate_cases"] = stats([g["gate_cases"] for g in gates])
            per_round.append(entry)
        out[m] = {"per_round": per_round}
    return out


def print_table(report: dict) -> None:
    def f(e: dict, d: int = 4) -> str:
        return "" if not e.get("n") else f"{e['mean']:.{d}f} ± {e['std']:.{d}f}"

    print("| method | round | status (seeds) | records | buy NDCG@10 | buy HR@10 | buy NDCG@10 kept | view NDCG@10 | "
          "view HR@10 | view NDCG@10 kept | view NDCG@10 - static (paired) | gate: candidate / active NDCG@10 | "
          "train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, s in report["summary"].items():
        for r, e in enumerate(s["per_round"]):
            status = ", ".join(f"{k} {v}" for k, v in e["status"].items())
            gate = (f"{f(e['gate_candidate_ndcg@10'])} / {f(e['gate_active_ndcg@10'])}"
                    if e["gate_cases"].get("n") else "")
            print(f"| {m} | {r} | {status} | {f(e['records'], 1)} | {f(e['buy_ndcg@10'])} | {f(e['buy_hr@10'])} | "
                  f"{f(e['buy_ndcg@10_kept'])} | {f(e['view_ndcg@10'])} | {f(e['view_hr@10'])} | "
                  f"{f(e['view_ndcg@10_kept'])} | {f(e.get('view_ndcg@10_minus_static', {}))} | {gate} | "
                  f"{f(e['train_seconds'], 1)} |")
    first = report["summary"][next(iter(report["summary"]))]["per_round"]
    print("cases per round (mean over seeds): buy " + ", ".join(f"{e['buy_cases']['mean']:.0f}" for e in first)
          + "; view " + ", ".join(f"{e['view_cases']['mean']:.0f}" for e in first))
    print("share of targets already in the history (a miss with history excluded): buy "
          + ", ".join(f"{e['buy_target_in_history']['mean']:.2f}" for e in first) + "; view "
          + ", ".join(f"{e['view_target_in_history']['mean']:.2f}" for e in first))


if __name__ == "__main__":
    main()
