"""The model registry: a directory of immutable model versions, one of them active, with atomic updates.

Layout of a registry root:

    index.json            every registered version's metadata, in registration order (rewritten atomically)
    active.json           {"version": "v0003", "history": ["v0001", "v0003"]} (rewritten atomically)
    versions/v0001/       safetensors weights, config, tokenizer, ... and version.json (its manifest)
    .tmp/                 versions being written; renamed into versions/ only when complete (what a
                          killed registration leaves here is removed by a later one, after 6 hours)

A version directory appears under `versions/` by one `os.rename` of a finished directory, and the index and
the active pointer are replaced with `os.replace`, so a server reading the registry never sees a half-written
version or a half-written pointer. Writers (register, activate, rollback) serialise on an `flock` over
`.lock`, so two trainers registering at once get distinct version names.

    reg = Registry("runs/registry")
    v = reg.register(lambda d: model.save(d), method="sft", data_window=DataWindow.from_events("beauty", train),
                     metrics={"valid_ndcg@10": 0.031})
    reg.activate(v.version)
    reg.active().path        # the directory to load weights from
    reg.rollback()           # back to the version that was active before
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST = "version.json"
INDEX = "index.json"
ACTIVE = "active.json"
STALE_TMP_S = 6 * 3600  # a registration still writing after this long is taken for a crashed one


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message names the version and what is wrong."""


class DataWindow(BaseModel):
    """The training data a version saw."""

    model_config = ConfigDict(extra="forbid")

    dataset: str  # dataset name (e.g. "amazon-beauty")
    first_timestamp: float | None = None  # earliest event time seen, seconds since the epoch
    last_timestamp: float | None = None  # latest event time seen
    n_events: int = 0  # training events
    n_users: int = 0  # distinct users in them
    n_items: int = 0  # distinct items in them

    @classmethod
    def from_events(cls, dataset: str, events) -> DataWindow:
        """Summarise an events DataFrame (canonical columns) as a data window."""
        ts = events["timestamp"] if len(events) else None
        return cls(dataset=dataset,
                   first_timestamp=None if ts is None else float(ts.min()),
                   last_timestamp=None if ts is None else float(ts.max()),
                   n_events=len(events), n_users=int(events["user_id"].nunique()),
                   n_items=int(events["item_id"].nunique()))


class VersionInfo(BaseModel):
    """Everything recorded about one version (also its manifest, `version.json`, inside its directory)."""

    model_config = ConfigDict(extra="forbid")

    version: str  # "v0001", "v0002", ... in registration order
    method: str  # what made it: "sft", "dpo", "ppo", "lora", ...
    parent: str | None = None  # the version it was fine-tuned from
    created: float  # registration time, seconds since the epoch
    data_window: DataWindow | None = None  # the data it was trained on
    metrics: dict[str, Any] = Field(default_factory=dict)  # its evaluation (e.g. the gate's numbers)
    config: dict[str, Any] = Field(default_factory=dict)  # the resolved training/model config
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256 of every file it holds
    note: str = ""  # free text (who/why)


@dataclass(frozen=True)
class ModelVersion:
    """A registered, verified version: its metadata and the directory its files live in."""

    info: VersionInfo
    path: Path

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def weights(self) -> list[Path]:
        return sorted(self.path.rglob("*.safetensors"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (after a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON next to `path`, flush it to disk, then swap it in with one os.replace."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class Registry:
    """Model versions under one root directory. Reading is lock-free; writing takes `.lock`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        for d in (self.root, self.root / "versions", self.root / ".tmp"):
            d.mkdir(parents=True, exist_ok=True)

    # ---- reading -------------------------------------------------------------------------------------------

    def list(self) -> list[VersionInfo]:
        """Every registered version, oldest first."""
        path = self.root / INDEX
        if not path.exists():
            return []
        try:
            raw = json.loads(path.read_text())
            return [VersionInfo.model_validate(v) for v in raw["versions"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as e:
            raise RegistryError(f"{path} is not a valid registry index: {e}") from e

    def get(self, version: str, verify: bool = True) -> ModelVersion:
        """A version, after checking its directory holds every file its manifest lists (with `verify`, also
        their sha256). A missing, broken or tampered version raises RegistryError saying what is wrong."""
        path = self.root / "versions" / version
        if not path.is_dir():
            known = ", ".join(v.version for v in self.list()) or "none"
            raise RegistryError(f"version {version!r} does not exist in {self.root} (registered: {known})")
        manifest = path / MANIFEST
        if not manifest.exists():
            raise RegistryError(f"version {version!r} is broken: {manifest} is missing")
        try:
            info = VersionInfo.model_validate_json(manifest.read_text())
        except ValidationError as e:
            raise RegistryError(f"version {version!r} is broken: {manifest} is not a valid manifest: {e}") from e
        if info.version != version:
            raise RegistryError(f"version {version!r} is broken: its manifest names it {info.version!r}")
        missing = [f for f in info.files if not (path / f).is_file()]
        if missing:
            raise RegistryError(f"version {version!r} is broken: files listed in its manifest are missing: "
                                f"{', '.join(missing)}")
        if verify:
            bad = [f for f, digest in info.files.items() if _sha256(path / f) != digest]
            if bad:
                raise RegistryError(f"version {version!r} is broken: checksum mismatch in {', '.join(bad)}")
        return ModelVersion(info, path)

    def _read_active(self) -> dict:
        path = self.root / ACTIVE
        if not path.exists():
            return {"version": None, "history": []}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RegistryError(f"{path} is not valid JSON: {e}") from e

    def active_version(self) -> str | None:
        """The name of the active version (cheap: one small file read; servers poll it to hot-reload)."""
        return self._read_active()["version"]

    def active(self, verify: bool = False) -> ModelVersion | None:
        """The active version, or None when nothing was activated yet."""
        v = self.active_version()
        return None if v is None else self.get(v, verify=verify)

    # ---- writing -------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def register(self, source: Path | str | Callable[[Path], None], *, method: str, parent: str | None = None,
                 data_window: DataWindow | None = None, metrics: dict | None = None, config: dict | None = None,
                 note: str = "", activate: bool = False) -> ModelVersion:
        """Add a version from a directory of files (copied) or a function that writes them into the directory
        it is given (e.g. `model.save`). It must hold at least one `.safetensors` file.

        The files are written and checksummed in `.tmp/`, and the finished directory is renamed into place;
        on any error nothing is registered and the temporary directory is removed.
        """
        if parent is not None and not (self.root / "versions" / parent).is_dir():
            raise RegistryError(f"parent version {parent!r} does not exist in {self.root}")
        tmp = self.root / ".tmp" / uuid.uuid4().hex
        try:
            if callable(source):
                tmp.mkdir()
                source(tmp)
            else:
                src = Path(source)
                if not src.is_dir():
                    raise RegistryError(f"cannot register {src}: not a directory")
                shutil.copytree(src, tmp)
            (tmp / MANIFEST).unlink(missing_ok=True)
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            if not any(p.suffix == ".safetensors" for p in files):
                raise RegistryError("cannot register a version without weights: no .safetensors file in "
                                    f"{source if not callable(source) else 'what the save function wrote'}")
            digests = {str(p.relative_to(tmp)): _sha256(p) for p in files}
            for p in files:  # data on disk before the rename makes the version visible
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            with self._locked():
                self._clean_tmp(keep=tmp)
                index = self.list()
                number = 1 + max((int(v.version[1:]) for v in index if v.version[1:].isdigit()), default=0)
                while (self.root / "versions" / f"v{number:04d}").exists():  # orphan of a crashed register
                    number += 1
                info = VersionInfo(version=f"v{number:04d}", method=method, parent=parent, created=time.time(),
                                   data_window=data_window, metrics=metrics or {}, config=config or {},
                                   files=digests, note=note)
                (tmp / MANIFEST).write_text(info.model_dump_json(indent=2))
                fsync_path(tmp)
                final = self.root / "versions" / info.version
                os.rename(tmp, final)
                fsync_path(final.parent)
                _write_json_atomic(self.root / INDEX, {"versions": [v.model_dump() for v in [*index, info]]})
                if activate:
                    self._activate_locked(info.version)
            return ModelVersion(info, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _clean_tmp(self, keep: Path, older_than_s: float = STALE_TMP_S) -> None:
        """Remove what registrations killed mid-way left in `.tmp/` (weights can be large). Only entries
        untouched for `older_than_s`: another process may be writing a version there right now."""
        now = time.time()
        for entry in self.root.joinpath(".tmp").iterdir():
            try:
                stale = entry != keep and now - entry.stat().st_mtime > older_than_s
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            if stale and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif stale:
                entry.unlink(missing_ok=True)

    def _activate_locked(self, version: str) -> None:
        self.get(version, verify=True)  # never point servers at a broken version
        state = self._read_active()
        if state["version"] == version:
            return
        _write_json_atomic(self.root / ACTIVE, {"version": version, "history": [*state["history"], version],
                                                "updated": time.time()})

    def activate(self, version: str) -> ModelVersion:
        """Make a (verified) version the active one; the previous one is remembered for rollback."""
        with self._locked():
            self._activate_locked(version)
        return self.get(version, verify=False)

    def rollback(self) -> ModelVersion:
        """Re-activate the version that was active before the current one."""
        with self._locked():
            state = self._read_active()
            history = list(state["history"])
            if len(history) < 2:
                raise RegistryError("nothing to roll back to: "
                                    + ("no version was activated yet" if not history else
                                       f"{history[-1]} is the only version ever activated"))
            previous = history[-2]
            self.get(previous, verify=True)
            _write_json_atomic(self.root / ACTIVE, {"version": previous, "history": history[:-1],
                                                    "updated": time.time()})
        return self.get(previous, verify=False)
