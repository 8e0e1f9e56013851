"""The model registry: register/get/list, activate/rollback, atomicity and clear errors on broken versions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from dragonrec.registry import DataWindow, Registry, RegistryError


def _writer(value: float):
    def save(d: Path) -> None:
        save_file({"w": torch.full((3, 2), value)}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"value": value}))
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "tokenizer.json").write_text("{}")
    return save


def test_register_get_list_round_trip(tmp_path):
    reg = Registry(tmp_path / "reg")
    events = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "timestamp": [10.0, 20.0, 30.0]})
    window = DataWindow.from_events("tiny", events)
    assert (window.first_timestamp, window.last_timestamp, window.n_events, window.n_users, window.n_items) == \
        (10.0, 30.0, 3, 2, 2)
    v1 = reg.register(_writer(1.0), method="sft", data_window=window, metrics={"ndcg@10": 0.1}, config={"lr": 1e-3})
    v2 = reg.register(_writer(2.0), method="dpo", parent=v1.version, metrics={"ndcg@10": 0.2})
    assert (v1.version, v2.version) == ("v0001", "v0002")

    got = Registry(tmp_path / "reg").get("v0002")  # a fresh reader sees the same thing
    assert got.info.method == "dpo" and got.info.parent == "v0001" and got.info.metrics == {"ndcg@10": 0.2}
    assert torch.equal(load_file(str(got.weights[0]))["w"], torch.full((3, 2), 2.0))
    assert (got.path / "tokenizer" / "tokenizer.json").exists()
    assert set(got.info.files) == {"model.safetensors", "config.json", "tokenizer/tokenizer.json"}
    first = reg.get("v0001").info
    assert first.data_window == window and first.config == {"lr": 1e-3} and first.created <= got.info.created
    assert [v.version for v in reg.list()] == ["v0001", "v0002"]
    assert json.loads((tmp_path / "reg" / "index.json").read_text())["versions"][1]["method"] == "dpo"
    assert not list((tmp_path / "reg" / ".tmp").iterdir())  # nothing left half-written


def test_register_from_directory_and_refuses_without_weights(tmp_path):
    reg = Registry(tmp_path / "reg")
    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="no .safetensors"):
        reg.register(src, method="sft")
    with pytest.raises(RegistryError, match="parent version 'v0009' does not exist"):
        reg.register(src, method="sft", parent="v0009")
    assert reg.list() == [] and not list((tmp_path / "reg" / "versions").iterdir())
    _writer(5.0)(src)
    v = reg.register(src, method="sft")
    assert v.version == "v0001" and (src / "model.safetensors").exists()  # the source is copied, not moved


def test_failed_save_registers_nothing(tmp_path):
    reg = Registry(tmp_path / "reg")

    def crash(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        reg.register(crash, method="sft")
    assert reg.list() == [] and not list((tmp_path / "reg" / "versions").iterdir())
    assert not list((tmp_path / "reg" / ".tmp").iterdir())


def test_activate_and_rollback(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.active() is None
    with pytest.raises(RegistryError, match="no version was activated"):
        reg.rollback()
    v1 = reg.register(_writer(1.0), method="sft", activate=True)
    assert reg.active().version == v1.version
    with pytest.raises(RegistryError, match="only version ever activated"):
        reg.rollback()
    v2 = reg.register(_writer(2.0), method="dpo", parent=v1.version)
    assert reg.active_version() == "v0001"  # registering does not promote
    reg.activate(v2.version)
    v3 = reg.register(_writer(3.0), method="ppo", parent=v2.version, activate=True)
    assert Registry(tmp_path / "reg").active().version == v3.version
    assert reg.rollback().version == "v0002"
    assert reg.active_version() == "v0002"
    assert reg.rollback().version == "v0001"
    with pytest.raises(RegistryError):
        reg.activate("v0042")
    assert reg.active_version() == "v0001"


def test_broken_versions_give_clear_errors(tmp_path):
    reg = Registry(tmp_path / "reg")
    v1 = reg.register(_writer(1.0), method="sft", activate=True)
    v2 = reg.register(_writer(2.0), method="sft")
    with pytest.raises(RegistryError, match=r"version 'v0007' does not exist .*registered: v0001, v0002"):
        reg.get("v0007")

    (v2.path / "model.safetensors").write_bytes(b"garbage")  # tampered / half-copied weights
    with pytest.raises(RegistryError, match=r"'v0002' is broken: checksum mismatch in model.safetensors"):
        reg.get("v0002")
    with pytest.raises(RegistryError, match="checksum mismatch"):
        reg.activate("v0002")
    assert reg.active_version() == v1.version  # a broken version is never activated

    (v2.path / "model.safetensors").unlink()
    with pytest.raises(RegistryError, match=r"'v0002' is broken: files listed in its manifest are missing: "
                                            r"model.safetensors"):
        reg.get("v0002", verify=False)
    (v2.path / "version.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"'v0002' is broken: .*version.json is not a valid manifest"):
        reg.get("v0002")
    (v2.path / "version.json").unlink()
    with pytest.raises(RegistryError, match=r"'v0002' is broken: .*version.json is missing"):
        reg.get("v0002")
    (tmp_path / "reg" / "index.json").write_text("[1, 2")
    with pytest.raises(RegistryError, match="not a valid registry index"):
        reg.list()


def test_readers_never_see_a_half_written_version(tmp_path):
    """A reader polling the active version while a writer registers and activates 15 versions."""
    reg = Registry(tmp_path / "reg")
    reg.register(_writer(0.0), method="sft", activate=True)
    stop, errors, seen = threading.Event(), [], set()

    def reader() -> None:
        r = Registry(tmp_path / "reg")
        while not stop.is_set():
            try:
                v = r.active(verify=True)
                w = load_file(str(v.weights[0]))["w"]
                assert float(w[0, 0]) == float(v.version[1:]) - 1
                seen.add(v.version)
            except Exception as e:  # noqa: BLE001 - any failure is the test's failure
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(1, 16):
            reg.register(_writer(float(k)), method="sft", activate=True)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert reg.active_version() == "v0016" and len(seen) >= 2
