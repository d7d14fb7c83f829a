"""Experiment trackers besides TensorBoard (docs/outputs.md, Trackers). This package's
interface: the registry TRACKERS, `check` (the `trackers` key, for config.validate) and
Trackers (what trainrun.metrics.Metrics fans its scalars out to).

TensorBoard stays the run's record: it is always in `trackers`, is written by Metrics
itself, and is what resume, sweeps and the tests read. The others each need their extra
(`pip install 'trainrun[<name>]'`), write where their library writes by default, offline,
and never stop a run: one that fails to open or fails mid-run is dropped with one warning,
and training goes on, its exit status unchanged.

    base.py     Tracker (the contract), Identity, the registration decorator
    mlflow.py   MLflow: its local store (sqlite:///mlflow.db) or MLFLOW_TRACKING_URI
    wandb.py    Weights & Biases: an offline run unless WANDB_MODE says otherwise
    trackio.py  trackio: its local database under TRACKIO_DIR
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import stat
from pathlib import Path

from trainrun import rundir
from trainrun.console import Console
from trainrun.errors import ConfigError, reason
from trainrun.trackers import mlflow, trackio, wandb  # noqa: F401 (their trackers register)
from trainrun.trackers.base import TRACKERS, Identity, Tracker

__all__ = ["IDS_FILE", "NAMES", "TRACKERS", "Identity", "Tracker", "Trackers", "check"]

RECORD = "tensorboard"  # Metrics' own SummaryWriter, always written
NAMES = (RECORD, *TRACKERS)
IDS_FILE = "trackers.json"  # tracker name -> the id of its run, to continue it on resume
ID = re.compile(r"[^\x00-\x1f\x7f]{1,4096}")  # a saved id: one line of text (a run directory)


def check(key: str, names: list[str]) -> None:
    """ConfigError naming `key` for an unknown tracker, one named twice, a list without
    tensorboard, or a tracker whose extra is not installed (the pip command that installs
    it). Looks the packages up without importing them."""
    for name in names:
        if name not in NAMES:
            raise ConfigError(key, f"unknown tracker {name!r}; allowed: {', '.join(NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(key, f"{list(names)} names a tracker twice; allowed: each once")
    if RECORD not in names:
        raise ConfigError(key, f"{list(names)} leaves out tensorboard, the run's record (resume, "
                               f"sweeps and the summary read it); allowed: "
                               f"[{', '.join([RECORD, *names])}]")
    for name in names:
        if name != RECORD and importlib.util.find_spec(TRACKERS[name].package) is None:
            raise ConfigError(key, f"{name} is not installed; allowed: pip install "
                                   f"'trainrun[{name}]'")


class Trackers:
    """The trackers of one run besides TensorBoard, each called in turn; whatever one raises
    drops it with one warning (`tracker <name> dropped: <why>; training goes on,
    TensorBoard has every record`). With no names (ranks other than 0, or only
    tensorboard), every call does nothing."""

    def __init__(self, names: list[str], run_dir: Path, identity: Identity, params: dict,
                 console: Console):
        self.console, self.active = console, []
        names = [n for n in names if n != RECORD]
        if not names:
            return
        saved = read_ids(run_dir, console)
        for name in names:
            try:
                opened = TRACKERS[name](identity, saved.get(name), params)
            except Exception as error:
                self._warn(name, error, "not opened")
                continue
            self.active.append(opened)
            verb = "continues" if saved.get(name) == opened.id else "writes"
            console.info(f"tracker {name} {verb} {opened.where}")
        ids = {**saved, **{t.name: t.id for t in self.active}}
        if ids != saved:
            try:
                rundir.write(run_dir / IDS_FILE, json.dumps(ids, indent=2) + "\n", run_dir)
            except OSError as error:
                console.warning(f"{IDS_FILE} not written ({reason(error)}): a resumed run "
                                f"will open new tracker runs")

    def log(self, values: dict[str, float], k: int) -> None:
        """The scalars TensorBoard receives at update k, by tag."""
        self._each(lambda t: t.log(values, k))

    def flush(self) -> None:
        self._each(lambda t: t.flush())

    def finish(self, summary: dict) -> None:
        """metrics.json's summary; end each tracker's run as the run ended."""
        self._each(lambda t: t.finish(summary, summary["status"]))
        self.active = []

    def _each(self, call) -> None:
        for t in list(self.active):
            try:
                call(t)
            except Exception as error:
                self.active.remove(t)
                self._warn(t.name, error, "dropped")

    def _warn(self, name: str, error: Exception, what: str) -> None:
        self.console.warning(f"tracker {name} {what}: {reason(error)}; training goes on, "
                             f"TensorBoard has every record")


def read_ids(run_dir: Path, console: Console) -> dict[str, str]:
    """trackers.json of run_dir: tracker name -> its run's id; {} when there is none. The run
    directory is data: the file is read as JSON, without following a link; one that is not
    a name -> id object is ignored with a warning (new tracker runs are opened)."""
    try:
        fd = os.open(run_dir / IDS_FILE,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}
    except OSError as error:
        console.warning(f"{run_dir / IDS_FILE} not read ({reason(error)}): new tracker runs")
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file")
            text = f.read(1 << 20)
    except OSError as error:
        console.warning(f"{run_dir / IDS_FILE} not read ({reason(error)}): new tracker runs")
        return {}
    try:
        ids = json.loads(text)
    except ValueError:
        ids = None
    if not isinstance(ids, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and ID.fullmatch(v)
            for k, v in ids.items()):
        console.warning(f"{run_dir / IDS_FILE} is not what trainrun writes (tracker name -> "
                        f"run id): new tracker runs")
        return {}
    return ids

