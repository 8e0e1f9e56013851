"""Crash safety: a process killed (SIGKILL) in the middle of a promotion, an index save or a training checkpoint
leaves what was there before whole. Each crash is real: a child process replaces one step of the write (a
rename, a file write) with SIGKILL to itself, so it dies at exactly that point; the parent then checks.

- the catalog change log: a line left unfinished by a killed writer does not swallow the next change;
- registry: killed while writing a version's files, before its directory is renamed into place, before the
  index is replaced, before the active pointer is replaced, and in the middle of an activation; a server
  watching the registry keeps serving the previous version throughout, and a later promotion still works;
- the FAISS index (index.py): killed while writing the index file and before the metadata commit: the previous
  save loads, whole; killed after the commit: the new one loads;
- training checkpoints (model/trainer.py): killed inside accelerate's save_state and in the middle of writing
  `best/`: the previous checkpoint's files are byte-for-byte what they were, and training resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import API_KEY, Server, beauty_slice, train_tiny

from dragonrec.index import IndexConfig, VectorIndex
from dragonrec.registry import Registry

KEY = {"X-API-Key": API_KEY}

# Prepended to every child: `die_at(owner, "name", k)` makes the k-th call of owner.name SIGKILL the process
# (before the call runs, or with after=True once it returned).
DIE = '''
import functools, json, os, signal, sys
ARGS = json.loads(sys.argv[1])

def die_at(owner, name, call=1, after=False):
    real, count = getattr(owner, name), [0]

    @functools.wraps(real)
    def wrapper(*a, **kw):
        count[0] += 1
        if count[0] == call and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **kw)
        if count[0] == call and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapper)
'''


def run_child(code: str, expect_killed: bool = True, **args) -> None:
    """Run `code` (after DIE) in a fresh interpreter with ARGS = args; it must die of SIGKILL (or succeed)."""
    proc = subprocess.run([sys.executable, "-c", DIE + textwrap.dedent(code), json.dumps(args, default=str)],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if expect_killed:
        assert proc.returncode == -signal.SIGKILL, f"the child did not die at the crash point:\n{proc.stderr[-3000:]}"
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def digests(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (symlinks followed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the registry: promotion ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A registry with v0001 active and v0002 registered, and a server watching it (reload every 0.1 s)."""
    root = tmp_path_factory.mktemp("crash")
    data = beauty_slice(root / "data", n_items=200, max_users=300)
    model = train_tiny(data, root / "model")
    reg = Registry(root / "registry")
    reg.register(model, method="sft", activate=True)
    reg.register(model, method="dpo", parent="v0001")
    env = {"DRAGONREC_DATA_DIR": str(data), "DRAGONREC_STATE_DIR": str(root / "state"),
           "DRAGONREC_REGISTRY_DIR": str(reg.root), "DRAGONREC_API_KEY": API_KEY,
           "DRAGONREC_RELOAD_INTERVAL_S": "0.1"}
    with Server(env, root / "server.log") as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").json()["model_version"] == "v0001"
        user = str(__import__("pandas").read_parquet(data / "interactions.parquet")["user_id"].iloc[0])
        yield {"root": root, "model": model, "registry": reg, "server": server, "client": client, "user": user,
               "v1_files": digests(reg.root / "versions" / "v0001")}


REGISTER = '''
from dragonrec.registry import Registry
{setup}
Registry(ARGS["registry"]).register(ARGS["model"], method="sft", parent="v0001", activate=True)
'''

HALF_WRITTEN = '''
import shutil
from pathlib import Path
from dragonrec.registry import Registry

def save(d):  # the trainer's save function, killed half-way through writing the weights
    shutil.copytree(ARGS["model"], d, dirs_exist_ok=True)
    weights = sorted(Path(d).rglob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    os.kill(os.getpid(), signal.SIGKILL)

Registry(ARGS["registry"]).register(save, method="sft", parent="v0001", activate=True)
'''

CRASHES = {
    "writing the version's files": HALF_WRITTEN,
    "before the version directory is renamed into place": REGISTER.replace("{setup}", 'die_at(os, "rename")'),
    "before the index is replaced": REGISTER.replace("{setup}", 'die_at(os, "replace", 1)'),
    "before the active pointer is replaced": REGISTER.replace("{setup}", 'die_at(os, "replace", 2)'),
    "in the middle of activating v0002": '''
        from dragonrec.registry import Registry
        die_at(os, "replace", 1)
        Registry(ARGS["registry"]).activate("v0002")
    ''',
}


@pytest.mark.parametrize("point", list(CRASHES))
def test_a_crash_in_a_promotion_leaves_the_previous_version_whole_and_serving(shop, point):
    reg = shop["registry"]
    run_child(CRASHES[point], registry=reg.root, model=shop["model"])
    assert reg.active_version() == "v0001"
    active = reg.active(verify=True)  # every file its manifest lists, checksums included
    assert digests(active.path) == shop["v1_files"]
    for info in reg.list():  # whatever the index lists is whole
        reg.get(info.version, verify=True)
    time.sleep(0.5)  # five reload intervals: the server has looked at the registry since the crash
    client = shop["client"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_version"] == "v0001" and health["load_error"] is None
    r = client.post("/v1/recommend", json={"user_id": shop["user"], "n": 5})
    assert r.status_code == 200 and r.json()["model_version"] == "v0001" and len(r.json()["items"]) == 5


def test_after_the_crashes_a_promotion_still_works_and_reaches_the_server(shop):
    """No crash left the registry wedged: the lock is free, a new version gets a name no orphan holds, and the
    server swaps to it."""
    reg = shop["registry"]
    leftovers = list((reg.root / ".tmp").iterdir())
    assert leftovers  # what the killed registrations were writing
    for p in leftovers:  # age them past the registry's patience: a later registration removes them
        os.utime(p, (time.time() - 7 * 3600, time.time() - 7 * 3600))
    run_child(REGISTER.replace("{setup}", ""), expect_killed=False, registry=reg.root, model=shop["model"])
    assert list((reg.root / ".tmp").iterdir()) == []
    new = reg.active_version()
    assert new not in ("v0001", "v0002") and reg.get(new, verify=True).info.parent == "v0001"
    deadline = time.monotonic() + 60
    while shop["client"].get("/health").json()["model_version"] != new and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shop["client"].post("/v1/recommend", json={"user_id": shop["user"], "n": 5}).json()["model_version"] == new


def test_a_product_added_after_a_writer_died_mid_line_is_not_lost(shop):
    """A process killed while appending to the catalog change log leaves an unfinished line; the next change
    (here through the running server) still gets a line of its own, and a restart replays it."""
    from dragonrec.data import load_dataset
    from dragonrec.serve.serving import replay_catalog_log

    log = shop["root"] / "state" / "catalog_changes.jsonl"
    with log.open("a") as f:
        f.write('{"op": "add", "item": {"item_id": "HALF-WRITTEN", "tit')  # what a SIGKILL mid-write leaves
    new = {"item_id": "AFTER-CRASH-1", "title": "Rosehip seed oil", "category": "Beauty > Skin Care"}
    assert shop["client"].post("/v1/items", json=new, headers=KEY).status_code == 201
    base = load_dataset(shop["root"] / "data").catalog
    replayed, _ = replay_catalog_log(log, base)  # what a restarted worker (or another one) reads
    assert "AFTER-CRASH-1" in replayed and "HALF-WRITTEN" not in replayed
    assert replayed.item(replayed.index_of("AFTER-CRASH-1")).title == "Rosehip seed oil"


# -- the FAISS index -----------------------------------------------------------------------------------------
def vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


SAVE_B = '''
import faiss, numpy as np
from dragonrec.index import VectorIndex
v = np.random.default_rng(2).normal(size=(60, 16)).astype(np.float32)
v /= np.linalg.norm(v, axis=1, keepdims=True)
b = VectorIndex.build(v, [f"b{i}" for i in range(60)], model="m")
{setup}
b.save(ARGS["path"])
'''


@pytest.mark.parametrize(("point", "setup", "survivor"), [
    ("writing the index file", 'die_at(faiss, "write_index", after=True)', "a"),
    ("before the metadata commit", 'die_at(os, "replace", 2)', "a"),
    ("after the metadata commit, before old files go", 'die_at(os, "replace", 2, after=True)', "b"),
])
def test_a_crash_while_saving_the_index_leaves_one_whole_index(tmp_path, point, setup, survivor):
    a = VectorIndex.build(vectors(50, 1), [f"a{i}" for i in range(50)], model="m", cfg=IndexConfig(kind="flat"))
    a.save(tmp_path / "index")
    run_child(SAVE_B.replace("{setup}", setup), path=tmp_path / "index")
    loaded = VectorIndex.load(tmp_path / "index", model="m", dim=16)
    n, seed = (50, 1) if survivor == "a" else (60, 2)
    assert len(loaded) == loaded.index.ntotal == n
    hits = loaded.search(vectors(n, seed), k=1)  # each vector finds itself: index and ids belong together
    assert loaded.item_ids_of(hits.labels[:, 0]).tolist() == [f"{survivor}{i}" for i in range(n)]
    loaded.save(tmp_path / "index")  # the next save clears what the crash left behind
    left = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert len(left) == 2 and left[0].startswith("index.") and left[1] == "meta.json"


# -- training checkpoints ------------------------------------------------------------------------------------
def tiny_training(ckpt: Path, epochs: int) -> list[int]:
    """A 16-wide one-layer model on 40 chain sequences, checkpointing into `ckpt`; the epochs it ran."""
    import torch

    from dragonrec.model import ItemTokenizer, SeqRecConfig, SeqRecLM
    from dragonrec.model.trainer import SFTConfig, train_sft

    torch.manual_seed(0)
    starts = np.random.default_rng(0).integers(15, size=40)
    seqs = [(np.array([(s + t) % 15 for t in range(6)]), np.array(["purchase"] * 6)) for s in starts]
    tok = ItemTokenizer.from_train(np.arange(15), 15)
    model = SeqRecLM(SeqRecConfig(hidden_size=16, num_layers=1, max_len=10), tok.n_items)
    cfg = SFTConfig(lr=1e-2, batch_size=16, max_epochs=epochs, warmup_steps=1, progress=False, quiet=True,
                    max_minutes=None, checkpoint_dir=str(ckpt))
    return [h["epoch"] for h in train_sft(model, tok, seqs, cfg=cfg).history]


# epoch 3 dies inside accelerate's save_state, once it wrote the new weights, before the commit
KILLED_TRAINING = f'''
import accelerate
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_crash_safety import tiny_training
die_at(accelerate.Accelerator, "save_state", after=True)
tiny_training(ARGS["ckpt"], 4)
'''


def test_a_crash_while_checkpointing_leaves_the_last_checkpoint_whole_and_resumable(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert tiny_training(ckpt, 2) == [1, 2]
    before = digests(ckpt / "last")
    assert json.loads((ckpt / "last" / "trainer.json").read_text())["epoch"] == 2
    run_child(KILLED_TRAINING, ckpt=ckpt)
    assert digests(ckpt / "last") == before
    # a resumed run continues after epoch 2, from that checkpoint
    assert tiny_training(ckpt, 3) == [1, 2, 3]
    assert json.loads((ckpt / "last" / "trainer.json").read_text())["epoch"] == 3
    assert sorted(p.name for p in ckpt.iterdir() if "last" in p.name) == ["last", "last.e3"]  # crash leftovers gone


BEST = '''
from pathlib import Path
from dragonrec.model.trainer import write_checkpoint

def write(d):  # a best/ save killed after its first file
    (Path(d) / "model.safetensors").write_bytes(b"new weights")
    os.kill(os.getpid(), signal.SIGKILL)

write_checkpoint(Path(ARGS["ckpt"]), "best", "e7", write)
'''


def test_a_crash_while_writing_best_leaves_the_previous_best(tmp_path):
    from dragonrec.model.trainer import write_checkpoint

    ckpt = tmp_path / "ckpt"
    (ckpt / "best").mkdir(parents=True)  # a checkpoint written before checkpoints were links: replaced cleanly
    (ckpt / "best" / "model.safetensors").write_bytes(b"legacy weights")
    write_checkpoint(ckpt, "best", "e3", lambda d: (d / "model.safetensors").write_bytes(b"old weights"))
    assert (ckpt / "best").is_symlink() and sorted(p.name for p in ckpt.iterdir()) == ["best", "best.e3"]
    run_child(BEST, ckpt=ckpt)
    assert (ckpt / "best" / "model.safetensors").read_bytes() == b"old weights"
    write_checkpoint(ckpt, "best", "e8", lambda d: (d / "model.safetensors").write_bytes(b"newer weights"))
    assert (ckpt / "best" / "model.safetensors").read_bytes() == b"newer weights"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "best.e8"]  # the crashed e7 is gone
    # a resumed run that redoes epoch 8 writes beside the live e8, never into it
    write_checkpoint(ckpt, "best", "e8", lambda d: (d / "model.safetensors").write_bytes(b"redone"))
    assert (ckpt / "best" / "model.safetensors").read_bytes() == b"redone"
