"""What `resume=` means on the command line: the run directory it names (or the one a path
inside a run points at), that run's saved overrides under the new ones, and what a
finished job of a resumed sweep gives back."""

from __future__ import annotations

import json
from pathlib import Path

from trainrun import rundir
from trainrun.cli.overrides import continue_run, key
from trainrun.errors import ConfigError
from trainrun.resume import quote


def finished_loss(run_dir: Path) -> float:
    """The best validation loss a finished run recorded (inf if none)."""
    try:
        best = json.loads((run_dir / "metrics.json").read_text())["best_val_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        best = None
    return float("inf") if best is None else float(best)


def resume_argv(argv: list[str], config_dir: Path | None = None) -> list[str]:
    """`resume=<run dir>` continues that run: its saved overrides, then these (config_dir:
    the folder --config-dir adds options from)."""
    given = [a for a in argv if key(a) == "resume"]
    if not given:
        return argv
    from trainrun.cli import override_value

    value = override_value(given[-1])
    if value in (None, "auto"):
        return argv
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
