"""The core model's training loop under real 2-process CPU DDP (`accelerate launch --multi_gpu`, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sft_runs_on_two_cpu_processes_in_step(tmp_path):
    pytest.importorskip("dragonrec.model.trainer")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(TESTS / "ddp_sft_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 for r in reports)  # two real processes, not one (`--cpu` would give 1)
    assert all(r["device"].startswith("cpu") and r["backend"] == "gloo" for r in reports)
    # DDP averages gradients: both ranks end with the same weights, though each saw half the batches
    assert reports[0]["param_sum"] == pytest.approx(reports[1]["param_sum"], rel=1e-5, abs=1e-5)
    assert reports[0]["param_abs_sum"] == pytest.approx(reports[1]["param_abs_sum"], rel=1e-5)
    for r in reports:
        assert r["losses"][-1] < 0.5 * r["losses"][0]
        assert r["best_ndcg"] > 0.9  # the chain's next item is certain; chance NDCG@10 is about 0.3
