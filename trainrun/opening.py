"""A run's first writes into its directory: refusing a directory that holds another run,
and the files a run writes as it starts (train.log, .hydra/, tokenizer.json, env.json),
none of them left behind when the disk is full."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainrun import data, resume, rundir, runinfo
from trainrun.cadence import recover_best
from trainrun.console import Console
from trainrun.errors import ConfigError, out_of_space

# What a run writes into its directory: another run there would mix with it or overwrite it.
RUN_FILES = ("checkpoints", "metrics.json", "train.log", "tb", ".hydra")


class StartFailed(Exception):
    """The disk filled up while the run wrote its first files; what it had written is
    removed again. str() is the one line that says so."""


def refuse_used(run_dir: Path, config_dir: Path | None = None) -> None:
    """A fresh run goes into a directory that holds no other run."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not held:
        return
    if resume.find(run_dir)[0] is not None:
        allowed = (f"`{resume.command(run_dir, config_dir)}` to continue it, or another "
                   f"hydra.run.dir")
    else:
        allowed = "another hydra.run.dir (it has no checkpoint to resume from)"
    raise ConfigError("hydra.run.dir", f"{run_dir} already holds a run ({', '.join(held)}); "
                                       f"allowed: {allowed}")


def write_first_files(run_dir: Path, console: Console, record: dict[str, str],
                      damaged: dict[Path, str], tokenizer: data.Tokenizer,
                      device: torch.device) -> None:
    """Write the files a run writes as it starts: from here on it writes into run_dir. A full disk here removes
    the entries this start made (a fresh run leaves no file; a resumed one its files as
    they were, but for lines appended to train.log) and raises StartFailed."""
    before = set(_entries(run_dir))
    try:
        console.open_log(run_dir / "train.log", within=run_dir)
        if record:
            rundir.folder(run_dir / ".hydra", within=run_dir)
        for name, text in record.items():
            rundir.write(run_dir / ".hydra" / name, text, within=run_dir)
        keep_tokenizer(run_dir, tokenizer)
        runinfo.write(run_dir, device)
    except Exception as error:
        full = out_of_space(error)
        if full is None:
            raise
        console.close()
        for name in set(_entries(run_dir)) - before - {rundir.LOCK}:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        raise StartFailed(f"failed: {full.strerror.lower()} while starting the run in "
                          f"{run_dir} (writing {full.filename or 'its first files'}); nothing "
                          f"it wrote was kept; free space, then run the same command "
                          f"again") from None
    for warning in resume.set_aside(damaged):
        console.warning(warning)
    restored = recover_best(run_dir / "checkpoints")  # before a save removes its copies
    if restored:
        console.warning(restored)


def _entries(run_dir: Path) -> list[str]:
    try:
        return [p.name for p in run_dir.iterdir()]
    except FileNotFoundError:
        return []


def keep_tokenizer(run_dir: Path, tokenizer: data.Tokenizer) -> None:
    """A copy of the run's tokenizer.json in its directory, which every checkpoint's
    meta.json names (the byte tokenizer has none)."""
    if hasattr(tokenizer, "to_str"):
        rundir.write(run_dir / data.RUN_FILE, tokenizer.to_str(), within=run_dir)
