"""`dragonrec serve --workers N`: N uvicorn worker processes on one port, each building the app from the
settings the command was given; the scheduled feedback loop is refused with several workers (it would run
in every one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from serve_helpers import API_KEY, beauty_slice, free_port
from typer.testing import CliRunner

from dragonrec.cli import app


def test_serve_with_two_workers_starts_both_and_answers(tmp_path):
    data = beauty_slice(tmp_path / "data", n_items=200, max_users=200)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DRAGONREC_API_KEY": API_KEY}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the server process writes it until the end
    cli = str(Path(sys.executable).parent / "dragonrec")  # the installed command, as an operator runs it
    proc = subprocess.Popen([cli, "serve", "--data", str(data), "--port", str(port),
                             "--state-dir", str(tmp_path / "state"), "--workers", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name().lower()]
            try:
                if len(workers) >= 2 and httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("two workers did not come up in 120 s:\n" + (tmp_path / "serve.log").read_text())
        assert len(workers) >= 2  # uvicorn's supervisor and its two worker processes
        with httpx.Client(base_url=url, timeout=30) as client:
            # fresh connections spread over the workers; every one answers with the same settings
            for k in range(8):
                r = httpx.post(url + "/v1/recommend", json={"user_id": f"visitor-{k}", "n": 3}, timeout=30)
                assert r.status_code == 200 and len(r.json()["items"]) == 3
            r = client.post("/v1/events", json={"events": [{"user_id": "v", "item_id": "nope", "action": "view"}]},
                            headers={"X-API-Key": API_KEY})  # the key and the catalog reached the workers
            assert r.status_code == 422 and "unknown item" in r.json()["detail"]
        # /metrics sums every worker's counts, whichever worker answers (fresh connections, both get asked)
        for _ in range(6):
            text = httpx.get(url + "/metrics", timeout=30).text
            counts = [line for line in text.splitlines()
                      if line.startswith('dragonrec_request_seconds_count{') and 'route="/v1/recommend"' in line]
            assert len(counts) == 1 and float(counts[0].split()[-1]) == 8.0, counts
        # ... and shows each live worker's serving state, labelled by its pid (each publishes it every watch)
        worker_pids = {str(p.pid) for p in workers if p.pid != proc.pid}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = httpx.get(url + "/metrics", timeout=30).text
            infos = [line for line in text.splitlines() if line.startswith("dragonrec_model_version_info{")]
            pids = {line.split('pid="')[1].split('"')[0] for line in infos}
            if len(pids) >= 2:
                break
            time.sleep(0.5)
        assert len(pids) == 2 and pids <= worker_pids, (infos, worker_pids)
        assert all('version="popularity"' in line for line in infos)  # no model registered: the fallback
        items = [line for line in text.splitlines() if line.startswith("dragonrec_catalog_items{")]
        live = httpx.get(url + "/health", timeout=30).json()["catalog_items"]
        assert len(items) == 2 and all(float(line.split()[-1]) == live for line in items), (items, live)
        assert any((tmp_path / "state").glob("metrics-*/*.db"))  # the workers' shared values
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_several_workers_refuse_the_scheduled_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAGONREC_LOOP_EVERY_S", "60")
    monkeypatch.setenv("DRAGONREC_LOOP_METHOD", "dpo")
    result = CliRunner().invoke(app, ["serve", "--data", str(tmp_path), "--workers", "2",
                                      "--state-dir", str(tmp_path / "state")])
    assert result.exit_code != 0
    assert "loop_every_s" in result.output and "dragonrec loop" in result.output
