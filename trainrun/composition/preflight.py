"""Pre-flight: before Hydra creates a run directory, the arguments of `trainrun` are read
(a resumed run's saved overrides, "one of these keys" pairs, model.init_from's shape), and
the overrides of every job are composed and validated, so that bad input gets one line and
nothing on disk changes."""

from __future__ import annotations

import sys
from pathlib import Path

from trainrun import identical, memory, ranks
from trainrun.composition import folders, outputs
from trainrun.composition.command_line import (
    composing_only,
    config_dir_from_flags,
    is_sweep,
    override_value,
    split_flags,
    sweep,
    task_overrides,
)
from trainrun.composition.composing import hydra_configs, validated_configs
from trainrun.composition.init_from import init_from_shape
from trainrun.composition.overrides import key, one_of
from trainrun.composition.resuming import resume_argv
from trainrun.config import Config

# Launchers whose jobs run on other machines (a login node submits them)
REMOTE = ("slurm", "submitit_slurm")
SORT_BY = "hydra.callbacks.sweep_summary.sort_by"


def arguments(argv: list[str]) -> list[str]:
    """The arguments `trainrun argv` runs with: Hydra's flags, then the overrides (Hydra takes
    no override after a flag's value), a resumed run's saved ones first, one key of a
    "one of these keys" pair replacing the other, and model.init_from's shape."""
    flags, overrides = split_flags(argv)
    if composing_only(flags):  # other flags (--info, --config-path, ...): no resumable job
        searching = any(key(o) == "hparams_search" and not o.endswith("=null") for o in overrides)
        overrides = resume_argv(overrides, config_dir_from_flags(flags),
                                sweep=searching or any(f in ("-m", "--multirun") for f in flags))
    return [*flags, *one_of(init_from_shape(overrides, config_dir_from_flags(flags)))]


def preflight(argv: list[str]) -> list[Config]:
    """Compose and validate the overrides of every job `trainrun argv` would run (each job
    of a basic sweep too), and Hydra's own choices (launcher, sweeper); raise ConfigError if
    any is bad, before anything is written. Returns the jobs' configs (none where they are
    known only as a sweeper runs them).

    With a launcher that runs the jobs on other machines (hydra/launcher=slurm), what
    depends on this machine (the device, its precisions, its memory) is left to each job.

    With --cfg (and --resolve, --package) the config is printed only if a run would take it;
    --config-dir adds its folder's options; Hydra's other flags (--info, --config-path,
    --config-name, ...) are left to Hydra; with another sweeper
    (hparams_search=optuna, hydra/sweeper=...) each job is validated as it starts.
    """
    multirun = any(a in ("-m", "--multirun") for a in argv)
    flags, argv = split_flags(argv)
    if not composing_only(flags):
        return []
    folder = config_dir_from_flags(flags)
    overrides = task_overrides(argv)
    added = [a for a in overrides if a.startswith(("+", "~")) and key(a).startswith("data.sources")]
    if added:  # a run records key=value overrides only (overrides.yaml), to be resumed
        from trainrun.errors import ConfigError

        raise ConfigError(key(added[0]), f"{added[0]!r}: a mixture's sources and their keys are "
                                         f"set without + or ~ (they take new names); allowed: "
                                         f"{added[0].lstrip('+~')}")
    searches = [a for a in overrides if key(a) == "hparams_search" and not a.endswith("=null")]
    hydra_own = [a for a in argv if not a.startswith("-") and a not in overrides]
    if hydra_own or searches:
        hydra_configs([[*hydra_own, *searches]], with_hydra=True, config_dir=folder)
    for a in hydra_own:  # Hydra would report it from inside its callback, in a traceback
        if key(a) == SORT_BY:
            from trainrun.errors import require_in
            from trainrun.sweep import SORTS

            require_in(SORT_BY, override_value(a), tuple(SORTS))
    if not any(f in ("--cfg", "-c") for f in flags):  # a run: Hydra will make its directory
        outputs.check([*flags, *argv])
    if searches or any(key(a) == "hydra/sweeper" and not a.endswith("=basic") for a in argv):
        # another sweeper: its jobs are known only as it runs them, each validated as it
        # starts; the values that every job shares are composed here
        shared = [o for o in overrides if not is_sweep(o)]
        hydra_configs([shared], config_dir=folder)
        if folder is not None:
            folders.check(folder, [shared], hydra_own)
        return []
    jobs, swept = sweep(overrides) if multirun else ([overrides], set())
    if folder is not None:
        folders.check(folder, jobs, hydra_own)
    from trainrun.runner import device_and_precision

    run_dir = next((Path(override_value(a)) for a in reversed(argv)
                    if a.startswith("hydra.run.dir=")), None)
    configs, modes = validated_configs(jobs, config_dir=folder), []
    remote = any(key(a) == "hydra/launcher" and override_value(a) in REMOTE for a in argv)
    for config in configs:
        if remote:  # its GPUs and memory are the cluster's, not this host's
            modes.append(remote_mode(config))
            continue
        device, precision = device_and_precision(config)  # the device and precision this machine can run
        modes.append(precision.mode)
        close = memory.check(config, device, ranks.launch_size())
        if close is not None:
            print(f"trainrun: warning: {close}", file=sys.stderr)
    if multirun:
        from trainrun.sweep import announce_swept

        announce_swept(swept)
        for line in identical.announce(identical.find(jobs, configs, modes)):
            print(f"trainrun: {line}", file=sys.stderr)
    for config in configs:
        if config.resume is not None and not multirun:
            from trainrun import resume

            if run_dir is not None or config.resume != "auto":
                resume.locate(config, run_dir or Path(config.resume))
    return configs


def remote_mode(config: Config) -> str:
    """The precision a job on another machine may run in, as far as this host can tell:
    auto may be fp16 there (a GPU without bfloat16), so its loss scaler's keys count."""
    import torch

    from trainrun.precision import FP16Config

    if isinstance(config.precision, FP16Config):  # fp16, and auto
        return "fp16"
    return config.precision.mode(torch.device("cpu"))
