"""`trainrun [overrides]`: train a model on the config the overrides compose (a sweep's jobs
under -m). Stop signals are caught from the first moment, before Hydra, torch and the rest
are imported, and `--version` needs none of them.

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
        from trainrun import composition

        signals.check()  # a stop that came while Hydra was imported
        composition.prepare_hydra()
        train()
    except signals.StartupStop as stop:
        remove_empty_run_dir()
        print(f"trainrun: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


def train() -> None:
    """Read and check the arguments (composition.preflight), make the run's directory, then
    hand the run, or each job of a sweep, to Hydra; a sweep in which a job failed exits 1."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        from trainrun.commands.help import usage

        print(usage())
        return
    from trainrun import signals
    from trainrun.composition import arguments, fail, outputs, preflight
    from trainrun.composition.job import hydra_job
    from trainrun.composition.summary import failures
    from trainrun.errors import ConfigError
    from trainrun.resume import AlreadyComplete

    try:
        sys.argv[1:] = arguments(sys.argv[1:])
        outputs.claim_given(sys.argv[1:])
        configs = preflight(sys.argv[1:])
        signals.check()  # a stop that came while torch was imported or a config composed
        outputs.record(sys.argv[1:])  # what exists where Hydra will make the run's directory
        sys.argv[1:] = outputs.one_run_dir(sys.argv[1:], configs)
    except ConfigError as error:
        fail(error)
    except AlreadyComplete as done:  # nothing to do, and nothing changed
        print(f"trainrun: {done}", file=sys.stderr)
        return
    hydra_job()
    failed = failures()  # a sweep in which a job failed exits 1 (docs/sweeps.md)
    if failed is not None:
        print(f"trainrun: {failed}", file=sys.stderr)
        sys.exit(1)


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
