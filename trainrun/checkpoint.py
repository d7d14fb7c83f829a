"""Checkpoints (SPEC §6, §7): checkpoints/step-XXXXXXXX/ with model.safetensors,
trainer_state.pt and meta.json, and checkpoints/latest naming the newest complete one.

A checkpoint is written into a temporary directory, its files fsynced, then renamed into
place, and only then is `latest` replaced (also by rename), so a crash during a save leaves
the previous checkpoint intact. meta.json holds the sha256 of every file. Loading never
unpickles arbitrary objects: safetensors for the weights, torch.load(weights_only=True)
for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

MODEL_FILE, STATE_FILE, META_FILE, LATEST = "model.safetensors", "trainer_state.pt", "meta.json", "latest"


def step_name(k: int) -> str:
    """At least 8 digits (the runs written so far), more from update 10^8 on."""
    return f"step-{k:08d}"


def step_number(path: Path) -> int | None:
    """k of a checkpoint directory named step_name(k); None for any other name."""
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, k: int, model: torch.nn.Module, state: dict, meta: dict,
         keep_last: int) -> Path:
    """Write checkpoint k atomically under root (checkpoints/), point `latest` at it, and
    keep the keep_last newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(k)
    if final.exists():  # already saved at this update (a periodic save, then the final one)
        return final
    for leftover in root.glob(".tmp-*"):  # from a process killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".tmp-{step_name(k)}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    files = {name: sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
    meta = {"step": k, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": files, **meta}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    # fault injection for crash-safety tests: a pause with the checkpoint half written
    time.sleep(float(os.environ.get("TRAINRUN_SAVE_PAUSE", "0")))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        _fsync(tmp / name)
    _fsync(tmp)
    os.rename(tmp, final)
    _fsync(root)
    _write_latest(root, final.name)
    _prune(root, keep_last)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync(root)


def _prune(root: Path, keep_last: int) -> None:
    for old in complete(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def complete(root: Path) -> list[Path]:
    """The checkpoint directories under root, oldest first (temporary ones excluded).

    Ordered by update number, not by name: from 10^8 on the names have more digits, and
    "step-100000000" sorts before "step-99999999" as text."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and step_number(p) is not None]
    return sorted(found, key=step_number)


def verify(path: Path) -> str | None:
    """None if checkpoint `path` is intact, else what is wrong with it."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        for name, digest in meta["sha256"].items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if sha256(path / name) != digest:
                return f"{name} does not match its sha256 in {META_FILE}"
    except (OSError, ValueError, KeyError) as exc:
        return f"{META_FILE} is unreadable ({exc})"
    return None


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


def load(path: Path, model: torch.nn.Module) -> dict:
    """Load the weights into `model` and return the trainer state."""
    load_model(model, str(path / MODEL_FILE), device=str(next(model.parameters()).device))
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
