"""The `trainrun` command's first steps, before Hydra, torch and the rest are imported:
stop signals are caught from the first moment, and `--version` needs none of them.

A stop signal (SIGINT, SIGTERM, SIGUSR1) before training has started ends the command with
one line and exit status 128 + the signal's number: nothing of a fresh run is left on disk
(the run directory is written only once the run is built), a resumed run's directory is as
it was. A stop that lands inside a library's code is acted on once that call returns, at
the next of trainrun's checks between start-up phases (trainrun.signals.check). Once
training runs, trainrun.signals.Signals takes over (finish the update, save, exit 128 +
signal)."""

from __future__ import annotations

import sys


def versions() -> str:
    """trainrun's version, and those of the libraries that decide what a run computes."""
    from importlib import metadata

    from trainrun import __version__

    found = []
    for dist in ("torch", "hydra-core", "omegaconf", "datasets"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return f"trainrun {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"


def main() -> None:
    from trainrun import signals

    signals.catch_startup()
    try:
        if "--version" in sys.argv[1:]:
            print(versions())
            return
        from trainrun.cli import main as cli_main

        signals.check()  # a stop that came while Hydra was imported
        cli_main()
    except signals.StartupStop as stop:
        remove_empty_run_dir()
        print(f"trainrun: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


def remove_empty_run_dir() -> None:
    """trainrun (or Hydra) makes the run directory before the run is built (which removes
    it on a refusal or a stop): a stop that comes in between leaves it empty, and it is
    removed here."""
    from trainrun import rundir, signals

    rundir.abandon()
    if signals.startup_run_dir() is not None:
        from pathlib import Path

        rundir.remove_if_empty(Path(signals.startup_run_dir()))


if __name__ == "__main__":
    main()
