"""What `resume=` means on the command line: the run directory it names (or the one a path
inside a run points at), that run's saved overrides under the new ones, and what a
finished job of a resumed sweep gives back.

`resume=` is trainrun's own key: its value is a path taken as the shell passed it (as
`--config-dir`'s is), never read through Hydra's grammar, in which a comma makes a sweep and
brackets, quotes or a non-ASCII letter are syntax; trainrun quotes it again wherever it
hands it on to Hydra."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainrun import rundir
from trainrun.composition.command_line import override_value
from trainrun.composition.overrides import continue_run
from trainrun.errors import ConfigError
from trainrun.resume import quote


def finished_loss(run_dir: Path) -> float:
    """The best validation loss a finished run recorded (inf if none)."""
    try:
        best = json.loads((run_dir / "metrics.json").read_text())["best_val_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        best = None
    return float("inf") if best is None else float(best)


def resume_argv(argv: list[str], config_dir: Path | None = None,
                sweep: bool = False) -> list[str]:
    """`resume=<run dir>` continues that run: its saved overrides, then these (config_dir:
    the folder --config-dir adds options from); `resume=auto` and `resume=null` are handed
    to Hydra as such. In a sweep (sweep=True) each job continues its own directory, so a
    run directory is refused."""
    given = [a for a in argv if a.startswith("resume=")]
    if not given:
        return argv
    value = resume_value(given[-1])
    if value in (None, "auto"):
        return [*(a for a in argv if not a.startswith("resume=")),
                f"resume={'null' if value is None else 'auto'}"]
    if sweep:
        raise ConfigError("resume", f"{value}: the jobs of a sweep each continue their own run "
                                    f"directory, not one run's; allowed: resume=auto with the "
                                    f"sweep's hydra.sweep.dir (finished jobs are skipped, stopped "
                                    f"ones resumed), or null")
    run_dir = Path(value).expanduser().resolve()
    inside = next((p for p in (run_dir.parent, run_dir.parent.parent)
                   if p != run_dir and (p / "checkpoints").is_dir()
                   and (run_dir.name == "checkpoints" or run_dir.parent.name == "checkpoints")),
                  None)
    if not (run_dir / "checkpoints").is_dir() and inside is not None:
        raise ConfigError("resume", f"{value} is inside the run directory {inside}; allowed: "
                                    f"resume={quote(str(inside))} (a run continues from its "
                                    f"newest intact checkpoint)")
    if not (run_dir / "checkpoints").is_dir():
        raise ConfigError("resume", f"{value}: no checkpoints/ in that directory; allowed: "
                                    f"a run directory with a checkpoint, auto, or null")
    rundir.check(run_dir, "resume")  # before its overrides are read
    return continue_run(run_dir, argv, config_dir)


def resume_value(argument: str) -> str | None:
    """The value of a `resume=...` argument: None for null, "auto", or the path after the
    first `=`, verbatim (any name the file system allows).

    A value wholly inside matching quotes that names nothing as written is read as Hydra
    reads it, so that the form trainrun prints and the documentation shows,
    `'resume="runs/wörk, [x]/run=1"'`, keeps working."""
    value = argument.partition("=")[2]
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    if quoted and not os.path.lexists(os.path.expanduser(value)):
        try:
            read = override_value(argument)
        except ConfigError:  # not Hydra's quoting after all: the literal path
            read = value
        value = read if isinstance(read, str) else value
    if value == "null":
        return None
    if not value.strip():
        raise ConfigError("resume", "no path given; allowed: null, auto, or a run directory")
    return value
