"""The feedback loop as a running shop drives it: its own store, registry and catalog, held-out users for the
gate, one round per `run()` (POST /v1/loop/run, or every `loop_every_s` seconds).

The gate's cases are the leave-one-out test cases (last positive event) of a fixed share of the dataset's
users, chosen by a hash of the user id, so the same users are held out in every process and every round; a
model trained by `dragonrec train sft` (leave-one-out) never trained on those targets, and those users' own
activity in the shop never feeds a round's training data.
"""

from __future__ import annotations

import threading
from typing import Any

from dragonrec.loop import FeedbackLoop, GateConfig, LoopConfig, gate_cases_from
from dragonrec.progress import log


class ServiceLoop:
    """`FeedbackLoop` over a started `Service` (its store, registry, base catalog and dataset events)."""

    def __init__(self, service, method: str | None = None, cfg: LoopConfig | None = None):
        self.service = service
        s = service.settings
        self.cfg = cfg or LoopConfig(method=method or s.loop_method or "dpo", min_new_events=s.loop_min_new_events,
                                     gate=GateConfig(max_ndcg_drop=s.loop_max_ndcg_drop))
        self._loop: FeedbackLoop | None = None
        self._lock = threading.Lock()

    def _build(self) -> FeedbackLoop:
        svc, s = self.service, self.service.settings
        gate, held = gate_cases_from(svc.events, s.loop_holdout_share, s.loop_gate_cases)
        log(None, f"loop: {self.cfg.method}, gate on {len(gate)} held-out users' last positive events", False)
        return FeedbackLoop(svc.registry, svc.store, svc.base_catalog, svc.events, gate, self.cfg,
                            state_path=svc.registry.root / "loop.json", holdout_users=held, quiet=False)

    @property
    def loop(self) -> FeedbackLoop:
        with self._lock:
            if self._loop is None:
                self._loop = self._build()
            return self._loop

    def run(self) -> dict[str, Any]:
        """One round; returns its result (status, reason, version, gate numbers)."""
        return self.loop.run_round().to_dict()

    def status(self) -> dict[str, Any]:
        if self._loop is None:
            return {"method": self.cfg.method, "rounds": [], "message": "no round has run in this process yet"}
        return {**self._loop.status(), "rounds": self._loop.rounds()}


def run_every(service, every_s: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread that asks the service for a loop round every `every_s` seconds until `stop` is set (a
    round still running when the next is due is left alone)."""

    def tick() -> None:
        while not stop.wait(every_s):
            try:
                service.run_loop()
            except Exception as e:  # noqa: BLE001 (already running, or no loop: try again next time)
                log(None, f"loop: {e}", False)

    t = threading.Thread(target=tick, name="dragonrec-loop-schedule", daemon=True)
    t.start()
    return t
