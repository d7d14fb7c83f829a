"""env.json: what ran, where, with which versions (docs/design.md, The run directory)."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from trainrun import rundir

PACKAGES = ("trainrun", "torch", "hydra-core", "omegaconf", "datasets", "rich", "tensorboard",
            "safetensors", "numpy")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the working tree trainrun runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [platform.processor() or platform.machine()],
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }


def write(run_dir: Path, device: torch.device) -> None:
    rundir.write(run_dir / "env.json", json.dumps(environment(device), indent=2) + "\n", run_dir)
