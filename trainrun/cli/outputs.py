"""Where Hydra will make the run's directory (`hydra.run.dir`, or a sweep's `hydra.sweep.dir`),
looked at before it makes it: a place trainrun can create it and write in (else one line
naming the key), and the nearest folder there that exists already, recorded so that a
refused or stopped start removes only what Hydra made for this run
(trainrun.rundir.remove_if_empty), wherever it is, and never a folder that was there before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from trainrun.errors import ConfigError

DEFAULTS = {"hydra.run.dir": "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}",
            "hydra.sweep.dir": "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}"}
INTERPOLATION = re.compile(r"(?<!\\)\$\{")  # an unescaped ${


def multirun(argv: list[str]) -> bool:
    """Whether argv runs a sweep (-m, or a search, which sets hydra.mode itself)."""
    from trainrun.cli.overrides import key

    return any(a in ("-m", "--multirun") or a == "hydra.mode=MULTIRUN"
               or key(a) == "hparams_search" and not a.endswith("=null") for a in argv)


def placed(argv: list[str]) -> tuple[str, str, Path]:
    """The key that places the run's directory (a sweep's, under -m), its value as Hydra
    reads it, and the folder it names before anything Hydra fills in at run time
    (`${now:...}`), absolute."""
    from trainrun.cli import override_value

    key = "hydra.sweep.dir" if multirun(argv) else "hydra.run.dir"
    given = [a for a in argv if a.startswith(f"{key}=")]
    value = str(override_value(given[-1])) if given else DEFAULTS[key]
    fixed, *rest = INTERPOLATION.split(value, maxsplit=1)
    if rest:  # the name that holds ${...} is made at run time: its folder is known
        fixed = fixed.rpartition("/")[0] if "/" in fixed else ""
    return key, value, Path(os.path.abspath(fixed.replace("\\${", "${") or "."))


def existing(path: Path) -> Path:
    """The nearest of path and the folders above it that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check(argv: list[str]) -> None:
    """ConfigError if Hydra cannot make the run's directory where argv places it, or trainrun
    could not write in it."""
    key, value, folder = placed(argv)
    found = existing(folder)
    allowed = f"allowed: a folder trainrun can create and write in ({key}=<folder>)"
    if not found.is_dir():
        raise ConfigError(key, f"{value}: {found} is not a folder; {allowed}")
    if not os.access(found, os.W_OK | os.X_OK):
        made = "write in" if found == folder else "create a folder in"
        raise ConfigError(key, f"{value}: cannot {made} {found} (permission denied); {allowed}")


def record(argv: list[str]) -> None:
    """Record the nearest folder that exists where argv places the run's directory, in the
    environment, which carries it to the jobs of a sweep (joblib and submitit run them in
    other processes): what Hydra makes below it is this run's."""
    from trainrun.rundir import MADE_UNDER

    os.environ[MADE_UNDER] = str(existing(placed(argv)[2]).resolve())
