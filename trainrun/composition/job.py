"""The job Hydra runs: one run of the config Hydra composed (each job of a sweep is one),
handed to the runner, with what the command line adds to it (trainrun.runner.Launch)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainrun import identical, rundir
from trainrun.composition.composing import load
from trainrun.composition.explain import fail
from trainrun.composition.overrides import added_config_dir
from trainrun.composition.resuming import finished_loss
from trainrun.errors import ConfigError
from trainrun.resume import AlreadyComplete


@hydra.main(version_base=None, config_path="pkg://trainrun.conf", config_name="config")
def hydra_job(cfg: DictConfig) -> float:
    """One run; in a sweep, returns its best validation loss to Hydra, or if it failed
    (a bad value found while building it, too many non-finite updates, a crash) inf carrying
    the error's line, so that the sweep goes on (docs/sweeps.md)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainrun import runner
    from trainrun.sweep import JobFailed, NotRun, crashed, sweep_command, tb_name

    hc = HydraConfig.get()
    in_sweep = hc.mode == RunMode.MULTIRUN
    repeats = identical.repeated(hc.job.num) if in_sweep else None
    if repeats is not None:
        rundir.remove_if_empty(Path(hc.runtime.output_dir))
        return NotRun(f"not run: identical to job {repeats[0]} ({repeats[1]})", repeats[0])
    # what Hydra would have saved in .hydra/, written by the run once it has started
    record = {"config.yaml": OmegaConf.to_yaml(cfg),
              "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
              "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task)}
    run_dir = Path(hc.runtime.output_dir)
    try:
        if in_sweep:  # the job's folder is the sweep directory's own, not a link out of it
            rundir.check_job(run_dir, Path(hc.sweep.dir))
        config = load(cfg)
        choices = {g: o for g, o in hc.runtime.choices.items()
                   if not g.startswith("hydra") and o is not None}
        added = added_config_dir(hc.runtime.config_sources)
        searched = list(hc.sweeper.get("params") or {}) if in_sweep else []
        job = runner.Launch(record, None if added is None else Path(added),
                            tb_name(list(hc.overrides.task), searched) if in_sweep else None,
                            hc.job.num if in_sweep else None, tuple(hc.overrides.task),
                            str(hc.sweep.dir) if in_sweep else None)
        summary = runner.run_training(config, run_dir, OmegaConf.to_yaml(cfg), choices, job)
    except ConfigError as error:
        if not in_sweep:
            fail(error)
        print(f"trainrun: error: {error} (job {hc.job.num}; the sweep goes on)", file=sys.stderr)
        return JobFailed(f"error: {error}")
    except AlreadyComplete as done:  # a sweep resumed: this job has finished before
        print(f"trainrun: {done}", file=sys.stderr)
        return finished_loss(run_dir)
    except runner.RunStopped as stop:
        if not in_sweep:
            raise
        if stop.code != 1:  # a signal stops the whole sweep
            print(f"trainrun: the sweep stopped at job {hc.job.num}; to continue all of it "
                  f"(finished jobs are skipped, stopped ones resumed):\n"
                  f"{sweep_command(sys.argv[1:], Path(hc.sweep.dir))}", file=sys.stderr)
            raise
        return JobFailed(stop.reason)
    except Exception as exc:
        if not in_sweep:
            raise
        return JobFailed(crashed(exc, hc.job.num, run_dir))
    return summary["best_val_loss"]
