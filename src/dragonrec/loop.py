"""The feedback loop: new logs -> rewards -> preference data -> fine-tune -> gate -> promote.

One round (`FeedbackLoop.run_round`):

1. read the impressions and events the store received since the last round (a cursor kept in the loop's
   state file, advanced only when a round finishes);
2. score every shown slot (`dragonrec.rewards`) and build preference data (`dragonrec.preferences`);
3. load the active version (the reference), copy it and fine-tune the copy with the configured method:
   `sft` (next-item training on the users' histories with their new positive events), `dpo`, `sdpo`
   (multi-negative) or `pg` (policy gradient against a reward function);
4. **gate**: the candidate's NDCG@10 on held-out users (cases it never trains on) must be at least
   (1 - `max_ndcg_drop`) of the active version's, and where the logs carry propensities the off-policy
   estimate (SNIPS) of its value must beat the active version's, estimated from the same logs (`off_policy`);
5. promote: register the candidate (parent, method, data window, gate results) and activate it in one
   registry transaction; a running service picks the new version up on its own (dragonrec.serve).

A round that fails or is interrupted before step 5 registers nothing and leaves the active version and the
cursor as they were; the next round sees the same logs again. `rollback()` (or `dragonrec models rollback`)
re-activates the previous version.

    loop = FeedbackLoop(registry, store, catalog, base_events, gate_cases, LoopConfig(method="dpo"))
    result = loop.run_round()        # RoundResult: promoted / refused / skipped, with every number
    loop.run(every_s=3600)           # on a schedule; or after_events=10_000
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from dragonrec.data.catalog import Catalog
from dragonrec.data.splits import EvalCases
from dragonrec.evaluate.experiment import saved_recommender_name
from dragonrec.evaluate.runner import evaluate_cases
from dragonrec.preferences import PreferenceConfig, build_groups, build_pairs, to_records
from dragonrec.progress import log
from dragonrec.recommenders import recommender_class
from dragonrec.recommenders.base import Recommender
from dragonrec.registry import DataWindow, Registry, RegistryError
from dragonrec.rewards import RewardConfig, attribute, rewards
from dragonrec.schema import Impression, positive_mask
from dragonrec.store import Store

METHODS = ("sft", "dpo", "sdpo", "pg")


class GateConfig(BaseModel):
    """What a candidate must show before it is promoted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ndcg_drop: float = Field(0.02, ge=0, le=1)  # relative: candidate >= (1 - this) x active, held-out NDCG@10
    off_policy: Literal["require", "when_logged", "off"] = "when_logged"
    """`require`: refuse unless the logs carry propensities and SNIPS says the candidate beats the logged value;
    `when_logged`: that check where propensities were logged, NDCG alone where the serving policy was
    deterministic (no off-policy estimate exists then); `off`: NDCG alone."""
    min_ess: float = Field(30.0, ge=0)  # an off-policy estimate with a smaller effective sample size is refused
    min_gain: float = 0.0  # SNIPS(candidate) - SNIPS(active), per slot, must exceed this


class LoopConfig(BaseModel):
    """One round's recipe."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["sft", "dpo", "sdpo", "pg"] = "dpo"
    method_config: dict[str, Any] = Field(default_factory=dict)  # fields of the method's config (DPOConfig, ...)
    min_new_events: int = Field(1, ge=0)  # fewer new events than this: the round is skipped
    min_records: int = Field(8, ge=1)  # fewer preference pairs / groups / sequences: skipped
    estimate_share: float = Field(0.3, ge=0, lt=1)
    """Where the logs carry propensities and the gate estimates off-policy: this share of the round's users is
    kept out of training and used only for the estimate (0: estimate on the training logs themselves)."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    seed: int = 0


@dataclass
class RoundData:
    """Everything a method may train on in one round."""

    catalog: Catalog
    events: pd.DataFrame  # the new events (canonical columns)
    impressions: list[Impression]
    slots: pd.DataFrame  # rewarded slots (rewards.rewards)
    history_events: pd.DataFrame  # base events + every stored event up to this round (for contexts)
    pairs: pd.DataFrame | None = None
    groups: pd.DataFrame | None = None
    # The part of the round's logs kept out of training for the off-policy estimate (None: not split).
    estimate_slots: pd.DataFrame | None = None
    estimate_impressions: list[Impression] | None = None
    contexts: dict | None = None  # request_id -> (history, actions) of the estimate's impressions, once computed

    def split_for_estimate(self, share: float) -> RoundData:
        """Users chosen by hash (`share` of them) leave the training data (events, impressions, slots) and
        become the off-policy estimate's: a candidate estimated on logs it trained on looks better than it is."""
        users = {imp.user_id for imp in self.impressions}
        est = holdout_users(users, share)
        if not est or est == users:
            return self
        keep = ~self.slots["user_id"].astype(str).isin(est)
        return RoundData(self.catalog, self.events[~self.events["user_id"].astype(str).isin(est)],
                         [i for i in self.impressions if i.user_id not in est], self.slots[keep].reset_index(drop=True),
                         self.history_events, estimate_slots=self.slots[~keep].reset_index(drop=True),
                         estimate_impressions=[i for i in self.impressions if i.user_id in est])


@dataclass
class RoundResult:
    """What one round did, and why."""

    round_id: str
    status: Literal["promoted", "refused", "skipped", "failed"]
    reason: str
    method: str
    parent: str | None
    version: str | None = None  # the registered candidate (promoted rounds only)
    data: dict[str, Any] = field(default_factory=dict)  # cursor range, counts of events/impressions/records
    train: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    started: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class LoopError(RuntimeError):
    """The loop cannot run: no active version, no store, an unknown method."""


# ---------------------------------------------------------------- held-out users


def holdout_users(user_ids, share: float) -> set[str]:
    """Users whose crc32(user id) falls in the first `share` of the hash range: the same users in every
    process, round and order."""
    cut = int(share * 2**32)
    return {str(u) for u in user_ids if zlib.crc32(str(u).encode()) < cut}


def gate_cases_from(events: pd.DataFrame, share: float = 0.1, max_cases: int = 2000) -> tuple[EvalCases, set[str]]:
    """The gate of a loop over a dataset: the leave-one-out test cases (last positive event) of a hash-chosen
    `share` of its users (at most `max_cases`), and those users (to keep out of training). A model trained by
    `dragonrec train sft` on the leave-one-out split never trained on these targets."""
    from dragonrec.data.splits import leave_one_out

    split = leave_one_out(events)
    held = holdout_users(split.test.user_ids, share)
    idx = np.flatnonzero([str(u) in held for u in split.test.user_ids])[:max_cases]
    return split.test.subset(idx), held


# ---------------------------------------------------------------- methods


def _sequences(data: RoundData, users: set[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per user with new positive events: every event they have, oldest first (the SFT input)."""
    ev = data.history_events[data.history_events["user_id"].isin(users)]
    ev = ev.sort_values(["user_id", "timestamp"], kind="stable")
    idx = data.catalog.indices(ev["item_id"].astype(str).tolist())
    ev = ev.assign(item_idx=idx)
    return [(g["item_idx"].to_numpy(np.int64), g["action"].to_numpy(dtype=object)) for _, g in ev.groupby("user_id")]


def train_sft_round(rec: Recommender, data: RoundData, method_config: dict) -> dict:
    """Supervised re-training on the new interactions: next-item training, starting from the active weights,
    on the full histories of the users who acted positively this round (old events are replayed, so the
    model does not forget them)."""
    from dragonrec.model.trainer import SFTConfig, train_sft

    pos = data.events[positive_mask(data.events["action"].to_numpy(dtype=object))]
    users = set(pos["user_id"].astype(str))
    seqs = _sequences(data, users)
    if not seqs:
        raise LoopError("no user acted positively this round: nothing to train on")
    cfg = SFTConfig(**({"lr": 2e-4, "max_epochs": 1, "max_minutes": None, "warmup_steps": 0, "quiet": True,
                        "label": "loop sft"} | method_config))
    rec.model.train()
    result = train_sft(rec.model, rec.tokenizer, seqs, valid=None, cfg=cfg)
    rec.model.eval()
    rec._merged = None
    return {"sequences": len(seqs), "epochs": cfg.max_epochs, "lr": cfg.lr, **result.to_dict()}


def impression_contexts(data: RoundData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(history, actions) of every impression of the round: the user's events strictly before it."""
    hist = data.history_events
    idx = np.asarray(data.catalog.indices(hist["item_id"].astype(str).tolist()), dtype=np.int64)
    ts = hist["timestamp"].to_numpy(dtype=np.float64)
    acts = hist["action"].to_numpy(dtype=object)
    rows = hist.groupby(hist["user_id"].astype(str)).indices  # user -> row positions, one pass
    histories, actions = [], []
    for imp in data.impressions:
        r = np.asarray(rows.get(imp.user_id, []), dtype=np.int64)
        r = r[np.argsort(ts[r], kind="stable")]
        r = r[ts[r] < (imp.timestamp if imp.timestamp is not None else np.inf)]
        histories.append(idx[r])
        actions.append(acts[r])
    return histories, actions


def _train_preference(method: str, rec: Recommender, data: RoundData, method_config: dict,
                      reward_fn: Callable | None) -> dict:
    if method == "dpo":
        from dragonrec.train.dpo import DPOConfig, train_dpo

        res = train_dpo(rec, to_records(data.pairs), DPOConfig(**method_config))
    elif method == "sdpo":
        from dragonrec.train.sdpo import SDPOConfig, train_sdpo

        res = train_sdpo(rec, to_records(data.groups), SDPOConfig(**method_config))
    elif method == "pg":
        from dragonrec.train.pg import PGConfig, train_pg

        if reward_fn is None:
            raise LoopError("the pg method needs a reward function (a reward model or the simulator)")
        histories, actions = impression_contexts(data)
        res = train_pg(rec, (histories, actions), reward_fn, PGConfig(**method_config))
    else:
        raise LoopError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return res.to_dict() if hasattr(res, "to_dict") else dict(res)


# ---------------------------------------------------------------- the loop


class FeedbackLoop:
    """Rounds of learning from the store's logs, promoted through a registry behind a gate."""

    def __init__(self, registry: Registry | str | Path, store: Store, catalog: Catalog, base_events: pd.DataFrame,
                 gate_cases: EvalCases, cfg: LoopConfig | None = None, state_path: str | Path | None = None,
                 reward_fn: Callable | None = None, off_policy: Callable | None = None, quiet: bool = False,
                 holdout_users: set[str] | frozenset[str] | None = None):
        """`base_events`: the dataset's events (histories before the store's); `gate_cases`: held-out cases
        (users whose targets no round trains on) for the NDCG gate; `reward_fn(histories, actions, lists)`: the
        pg method's reward; `off_policy(candidate, rewarded_slots) -> dict(estimate, logged, ess)`: the off-policy
        gate's estimator (dragonrec.evaluate.off_policy by default); `holdout_users`: users whose impressions and
        events never feed a round's training data (the users of `gate_cases`, when they also use the shop)."""
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self.store = store
        self.catalog = catalog
        self.base_events = base_events
        self.gate_cases = gate_cases
        self.cfg = cfg or LoopConfig()
        self.state_path = Path(state_path) if state_path else self.registry.root / "loop.json"
        self.reward_fn = reward_fn
        self.off_policy = off_policy
        self.quiet = quiet
        self.holdout_users = frozenset(map(str, holdout_users or ()))
        self._lock = threading.Lock()  # one round at a time in this process
        self._ndcg_cache: dict[str, float] = {}
        self.running = False
        self.last_candidate: Recommender | None = None  # the latest round's fine-tuned model, promoted or not

    # --- state ---------------------------------------------------------------------------------------

    def state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"events_cursor": 0, "impressions_cursor": 0, "rounds": []}

    def _save_state(self, state: dict) -> None:
        tmp = self.state_path.with_name(f".{self.state_path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(state, indent=2, default=float))
        os.replace(tmp, self.state_path)

    def status(self) -> dict:
        st = self.state()
        return {"running": self.running, "active_version": self.registry.active_version(),
                "method": self.cfg.method, "events_cursor": st["events_cursor"],
                "impressions_cursor": st["impressions_cursor"], "rounds": len(st["rounds"]),
                "last_round": st["rounds"][-1] if st["rounds"] else None}

    def rounds(self) -> list[dict]:
        """Every round, flat: round, status, version, parent, method, promoted, created, reward (mean logged
        reward per shown slot of the round's data), heldout_ndcg and diversity (the candidate's, on the gate
        cases), reason."""
        out = []
        for i, r in enumerate(self.state()["rounds"]):
            gate = r.get("gate") or {}
            cand = gate.get("candidate_held_out") or {}
            out.append({"round": i + 1, "id": r.get("round_id"), "status": r.get("status"),
                        "version": r.get("version"), "parent": r.get("parent"), "method": r.get("method"),
                        "promoted": r.get("status") == "promoted", "created": r.get("started"),
                        "reward": (r.get("data") or {}).get("reward_per_slot"),
                        "heldout_ndcg": cand.get("ndcg@10"), "diversity": cand.get("ild_category@10"),
                        "reason": r.get("reason")})
        return out

    def rollback(self) -> str:
        return self.registry.rollback().version

    # --- one round -----------------------------------------------------------------------------------

    def load_active(self) -> tuple[str, Recommender]:
        active = self.registry.active()
        if active is None:
            raise LoopError(f"no active version in {self.registry.root}: train one first (dragonrec train sft "
                            "--registry ...)")
        rec = recommender_class(saved_recommender_name(active.path)).load(active.path, self.catalog)
        return active.version, rec

    def held_out(self, rec: Recommender, version: str | None = None) -> dict[str, float]:
        """NDCG@10, HR@10, coverage and category diversity of the top 10 on the gate cases (cached by version)."""
        if version is not None and version in self._ndcg_cache:
            return self._ndcg_cache[version]
        res = evaluate_cases(rec, self.gate_cases)
        value = {"ndcg@10": float(res["metrics"]["ndcg@10"]), "hr@10": float(res["metrics"]["hr@10"]),
                 **{k: float(v) for k, v in res["beyond"].items()}}
        if version is not None:
            self._ndcg_cache[version] = value
        return value

    def held_out_ndcg(self, rec: Recommender, version: str | None = None) -> float:
        return self.held_out(rec, version)["ndcg@10"]

    def collect(self, state: dict) -> tuple[RoundData, dict]:
        events, ev_cursor = self.store.new_events(after=state["events_cursor"])
        impressions, imp_cursor = self.store.new_impressions(after=state["impressions_cursor"])
        if self.holdout_users:  # held-out users are measured on, never trained on
            events = events[~events["user_id"].astype(str).isin(self.holdout_users)].reset_index(drop=True)
            impressions = [imp for imp in impressions if imp.user_id not in self.holdout_users]
        slots = rewards(attribute(impressions, events, self.cfg.reward), self.cfg.reward) if impressions else None
        cols = ["user_id", "item_id", "action", "timestamp", "request_id", "value"]
        stored = self.store.all_events()
        history = pd.concat([self.base_events.reindex(columns=cols), stored.reindex(columns=cols)],
                            ignore_index=True)
        data = RoundData(self.catalog, events, impressions, slots, history)
        info = {"events_cursor": [state["events_cursor"], ev_cursor],
                "impressions_cursor": [state["impressions_cursor"], imp_cursor],
                "new_events": len(events), "new_impressions": len(impressions)}
        return data, info

    def run_round(self, fail_after: str | None = None) -> RoundResult:
        """One round; never leaves a half-promoted version. `fail_after` (tests) raises after a named step."""
        if not self._lock.acquire(blocking=False):
            raise LoopError("a round is already running")
        self.running = True
        t0 = time.time()
        state = self.state()
        rid = f"r{len(state['rounds']) + 1:04d}"
        method = self.cfg.method
        parent = self.registry.active_version()
        result = RoundResult(rid, "failed", "", method, parent, started=t0)
        try:
            data, info = self.collect(state)
            result.data = info
            if info["new_events"] < self.cfg.min_new_events or data.slots is None:
                result.status, result.reason = "skipped", (
                    f"{info['new_events']} new events and {info['new_impressions']} new impressions "
                    f"(at least {self.cfg.min_new_events} events and one impression needed)")
                return result
            result.data["reward_per_slot"] = float(data.slots["reward"].mean()) if len(data.slots) else None
            if self.cfg.estimate_share and self._estimates_off_policy(data):
                data = data.split_for_estimate(self.cfg.estimate_share)
                result.data["estimate_impressions"] = len(data.estimate_impressions or [])
            n_records = self._prepare(data)
            result.data["records"] = n_records
            if n_records < self.cfg.min_records:
                result.status, result.reason = "skipped", (
                    f"{n_records} training records for {method} (at least {self.cfg.min_records} needed)")
                return result
            _maybe_fail(fail_after, "collect")
            parent, reference = self.load_active()
            result.parent = parent
            candidate = copy.deepcopy(reference)
            self.last_candidate = candidate
            log(None, f"loop {rid}: {method} on {n_records} records from {info['new_events']} events "
                      f"(parent {parent})", self.quiet)
            result.train = (train_sft_round(candidate, data, self.cfg.method_config) if method == "sft" else
                            _train_preference(method, candidate, data, self.cfg.method_config, self.reward_fn))
            _maybe_fail(fail_after, "train")
            result.gate = self.gate(reference, parent, candidate, data)
            _maybe_fail(fail_after, "gate")
            if not result.gate["passed"]:
                result.status, result.reason = "refused", result.gate["reason"]
                return result
            window = DataWindow.from_events("feedback", data.events)
            version = self.registry.register(
                lambda d: candidate.save(d), method=method, parent=parent, data_window=window,
                metrics={"gate": result.gate, "train": _jsonable(result.train)},
                config={"loop": self.cfg.model_dump(mode="json"), "round": rid, **result.data}, activate=True)
            result.version, result.status, result.reason = version.version, "promoted", result.gate["reason"]
            self._ndcg_cache[version.version] = result.gate["candidate_held_out"]
            return result
        except Exception as e:  # the round failed: nothing was promoted, the cursor stays
            result.status, result.reason = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            result.seconds = time.time() - t0
            if result.status in ("promoted", "refused"):
                # Logs a round has judged are consumed (a refused candidate's data is not retried forever); a
                # skipped round (too little data) leaves them to accumulate for the next one.
                state["events_cursor"] = result.data.get("events_cursor", [0, state["events_cursor"]])[1]
                state["impressions_cursor"] = result.data.get("impressions_cursor",
                                                              [0, state["impressions_cursor"]])[1]
            state["rounds"].append(_jsonable(result.to_dict()))
            self._save_state(state)
            log(None, f"loop {rid}: {result.status} ({result.reason}) in {result.seconds:.0f} s", self.quiet)
            self.running = False
            self._lock.release()

    def _estimates_off_policy(self, data: RoundData) -> bool:
        return self.cfg.gate.off_policy != "off" and _explored(data.slots)

    def _prepare(self, data: RoundData) -> int:
        method = self.cfg.method
        if method == "dpo":
            data.pairs = build_pairs(data.slots, data.history_events, self.cfg.preference)
            return len(data.pairs)
        if method == "sdpo":
            data.groups = build_groups(data.slots, data.history_events, self.cfg.preference)
            return len(data.groups)
        if method == "pg":
            return len(data.impressions)
        pos = positive_mask(data.events["action"].to_numpy(dtype=object))
        return int(data.events.loc[pos, "user_id"].nunique())

    def gate(self, reference: Recommender, ref_version: str, candidate: Recommender, data: RoundData) -> dict:
        g = self.cfg.gate
        ref, cand = self.held_out(reference, ref_version), self.held_out(candidate)
        ref_ndcg, cand_ndcg = ref["ndcg@10"], cand["ndcg@10"]
        floor = (1.0 - g.max_ndcg_drop) * ref_ndcg
        out: dict[str, Any] = {"active_ndcg@10": ref_ndcg, "candidate_ndcg@10": cand_ndcg, "ndcg_floor": floor,
                               "gate_cases": len(self.gate_cases), "ndcg_ok": cand_ndcg >= floor,
                               "candidate_held_out": cand, "active_held_out": ref}
        logged = _explored(data.slots)
        ope_needed = g.off_policy == "require" or (g.off_policy == "when_logged" and logged)
        if ope_needed:
            if not logged:
                out.update(ope_ok=False, ope_reason="no logged propensities below 1: the serving policy was "
                                                  "deterministic (serve with exploration to estimate)")
            else:
                # Both served as they would be (greedily), both estimated from the same logs: the candidate must
                # beat the active version, not the exploring policy that logged them.
                estimate = self.off_policy or default_off_policy
                est, ref = estimate(candidate, data), estimate(reference, data)
                out["off_policy"] = est
                out["off_policy_active"] = ref
                gain = est["estimate"] - ref["estimate"]
                out["ope_ok"] = bool(min(est["ess"], ref["ess"]) >= g.min_ess and gain > g.min_gain)
                out["ope_reason"] = (f"SNIPS {est['estimate']:.4f} vs active {ref['estimate']:.4f} per slot "
                                     f"(ESS {est['ess']:.0f} / {ref['ess']:.0f}; logged {est['logged']:.4f})")
        else:
            out["ope_ok"] = True
            out["ope_reason"] = "off-policy check off" if g.off_policy == "off" else \
                "not estimable: no logged propensities (deterministic serving)"
        out["passed"] = bool(out["ndcg_ok"] and out["ope_ok"])
        ndcg_text = f"held-out NDCG@10 {cand_ndcg:.4f} vs active {ref_ndcg:.4f} (floor {floor:.4f})"
        out["reason"] = f"{ndcg_text}; {out['ope_reason']}"
        return out

    # --- triggers ------------------------------------------------------------------------------------

    def run(self, every_s: float | None = None, after_events: int | None = None, max_rounds: int | None = None,
            stop: threading.Event | None = None, poll_s: float = 5.0) -> list[RoundResult]:
        """Rounds on a schedule (`every_s`) or whenever `after_events` new events have arrived (or both: whichever
        comes first), until `stop` is set or `max_rounds` rounds ran. A failed round is logged and retried at
        the next trigger."""
        stop = stop or threading.Event()
        results: list[RoundResult] = []
        last = time.time()
        seen = -1  # stored events at the last round: an event trigger waits for `after_events` more than that
        while not stop.is_set() and (max_rounds is None or len(results) < max_rounds):
            total = self.store.counts().events if after_events else 0
            pending = total - self.state()["events_cursor"] if after_events else 0
            due = (every_s is not None and time.time() - last >= every_s) or \
                  (after_events is not None and pending >= after_events
                   and (seen < 0 or total - seen >= after_events))
            if due or (every_s is None and after_events is None):
                last, seen = time.time(), total
                try:
                    results.append(self.run_round())
                except Exception as e:  # noqa: BLE001 (a failed round must not end the loop)
                    log(None, f"loop round failed: {type(e).__name__}: {e}", self.quiet)
                if every_s is None and after_events is None:
                    break
            stop.wait(poll_s)
        return results


def default_off_policy(candidate: Recommender, data: RoundData) -> dict:
    """SNIPS estimate of the candidate's reward per slot from the round's logged propensities (on the users
    kept out of training when the round was split). The requests' contexts are computed once per round."""
    from dragonrec.evaluate.off_policy import contexts_from_events, estimate_candidate

    held = data.estimate_slots is not None and len(data.estimate_slots)
    slots, impressions = (data.estimate_slots, data.estimate_impressions) if held else (data.slots, data.impressions)
    if data.contexts is None:
        data.contexts = contexts_from_events(impressions, data.history_events, data.catalog)
    return estimate_candidate(candidate, slots, impressions, data.history_events, data.catalog,
                              contexts=data.contexts)


def _explored(slots: pd.DataFrame) -> bool:
    """Whether the serving policy explored: some slot logged a probability below 1. All 1.0 (or none logged)
    is deterministic serving, under which no other policy's value can be estimated."""
    prop = slots["propensity"] if "propensity" in slots.columns else pd.Series(dtype=float)
    return bool((prop.notna() & (prop < 1.0)).any())


def _maybe_fail(fail_after: str | None, step: str) -> None:
    if fail_after == step:
        raise RuntimeError(f"interrupted after {step} (test)")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float | int | str | bool) or x is None:
        return x
    return str(x)


__all__ = [
    "FeedbackLoop",
    "GateConfig",
    "LoopConfig",
    "LoopError",
    "RegistryError",
    "RoundData",
    "RoundResult",
    "gate_cases_from",
    "holdout_users",
    "train_sft_round",
]
