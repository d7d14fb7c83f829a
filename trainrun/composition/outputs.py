"""Where Hydra will make the run's directory (`hydra.run.dir`, or a sweep's `hydra.sweep.dir`),
looked at before it makes it: a place trainrun can create it and write in (else one line
naming the key), and the nearest folder there that exists already, recorded so that a
refused or stopped start removes only what Hydra made for this run
(trainrun.rundir.remove_if_empty), wherever it is, and never a folder that was there before.

A single job's directory is made and claimed here, before Hydra starts (one_run_dir), so
that no other process writes it from pre-flight to the end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from trainrun import distributed, ranks, rundir
from trainrun.composition.command_line import override_value, runs_one_job
from trainrun.composition.overrides import key
from trainrun.config import Config
from trainrun.errors import ConfigError
from trainrun.resume import quote

DEFAULTS = {"hydra.run.dir": "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}",
            "hydra.sweep.dir": "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"}
INTERPOLATION = re.compile(r"(?<!\\)\$\{")  # an unescaped ${


def multirun(argv: list[str]) -> bool:
    """Whether argv runs a sweep (-m, or a search, which sets hydra.mode itself)."""
    return any(a in ("-m", "--multirun") or a == "hydra.mode=MULTIRUN"
               or key(a) == "hparams_search" and not a.endswith("=null") for a in argv)


def placed(argv: list[str]) -> tuple[str, str, Path]:
    """The key that places the run's directory (a sweep's, under -m), its value as Hydra
    reads it, and the folder it names before anything Hydra fills in at run time
    (`${now:...}`), absolute."""
    name = "hydra.sweep.dir" if multirun(argv) else "hydra.run.dir"
    given = [a for a in argv if a.startswith(f"{name}=")]
    value = str(override_value(given[-1])) if given else DEFAULTS[name]
    fixed, *rest = INTERPOLATION.split(value, maxsplit=1)
    if rest:  # the name that holds ${...} is made at run time: its folder is known
        fixed = fixed.rpartition("/")[0] if "/" in fixed else ""
    return name, value, Path(os.path.abspath(fixed.replace("\\${", "${") or "."))


def existing(path: Path) -> Path:
    """The nearest of path and the folders above it that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check(argv: list[str]) -> None:
    """ConfigError if Hydra cannot make the run's directory where argv places it, or trainrun
    could not write in it."""
    name, value, folder = placed(argv)
    found = existing(folder)
    allowed = f"allowed: a folder trainrun can create and write in ({name}=<folder>)"
    if not found.is_dir():
        raise ConfigError(name, f"{value}: {found} is not a folder; {allowed}")
    if not os.access(found, os.W_OK | os.X_OK):
        made = "write in" if found == folder else "create a folder in"
        raise ConfigError(name, f"{value}: cannot {made} {found} (permission denied); {allowed}")


def record(argv: list[str]) -> None:
    """Record the nearest folder that exists where argv places the run's directory, in the
    environment, which carries it to the jobs of a sweep (joblib and submitit run them in
    other processes): what Hydra makes below it is this run's."""
    os.environ[rundir.MADE_UNDER] = str(existing(placed(argv)[2]).resolve())


def given_run_dir(argv: list[str]) -> Path | None:
    """The run directory a single job's `hydra.run.dir=` names (resume=<dir> adds it)."""
    found = [a for a in argv if not a.startswith("-") and key(a) == "hydra.run.dir"]
    return Path(override_value(found[-1])) if found and runs_one_job(argv) else None


def claim_given(argv: list[str]) -> None:
    """Claim the run directory a single job names, when it exists already (a resume, a run
    into a fixed hydra.run.dir): no other process writes it from pre-flight to the end
    (rank 0 claims for a distributed launch). A new one is claimed as it is made."""
    run_dir = given_run_dir(argv)
    if run_dir is not None and run_dir.is_dir() and ranks.launch_rank() == 0:
        named = any(key(a) == "resume" and override_value(a) not in (None, "auto") for a in argv)
        rundir.claim(run_dir, "resume" if named else "hydra.run.dir")


def one_run_dir(argv: list[str], configs: list[Config]) -> list[str]:
    """A single job's run directory, made and claimed before Hydra starts: a fixed
    hydra.run.dir, else outputs/<date>/<time> (<time>-1, -2, ... when another run took that
    second). Under torchrun or srun every process joins the process group here, with the
    backend of the run's device (`configs`: the job's, from pre-flight), and takes rank 0's
    directory. A sweep's jobs join theirs when they run."""
    if any(a in ("-m", "--multirun") for a in argv):
        size = ranks.launch_size()
        if size > 1:
            raise ConfigError("--multirun", f"a sweep cannot run inside a distributed launch "
                                            f"({size} processes); allowed: a sweep whose jobs "
                                            f"are distributed (hydra/launcher=slurm)")
        return argv
    if configs:
        from trainrun.runner import device_and_precision

        world = distributed.init(device_and_precision(configs[0])[0])
    else:
        world = distributed.current()
    if not runs_one_job(argv):
        return argv
    given = given_run_dir(argv)
    if given is not None:
        if world.main:
            rundir.claim(given, "hydra.run.dir")
        return argv
    made = str(rundir.fresh(Path("outputs"))) if world.main else None
    return [*argv, f"hydra.run.dir={quote(distributed.broadcast(made))}"]
