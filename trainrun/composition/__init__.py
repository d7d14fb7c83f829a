"""Composition: the command line and the YAML options become validated configs. The only
package that touches Hydra; every command composes its config here, and nothing below the
commands but the commands after training (trainrun.after) imports it.

Before Hydra creates a run directory, the overrides of a single run are composed and
validated here ("preflight"), so that bad input gets one line, `trainrun: error: <key>:
<what is wrong and what is allowed>`, exit status 2, and nothing on disk changes. Hydra
writes nothing into a run directory itself (`hydra.output_subdir: null` in conf/config.yaml):
the run writes .hydra/ once it has really started, so a refused or failed start changes no file.

    explain.py       the one-line errors: Hydra's and OmegaConf's as ConfigError, `fail`
    command_line.py  Hydra's flags and the overrides, one override's value, a sweep's jobs,
                     the folder --config-dir names
    overrides.py     override lists: group options, "one of these keys" pairs, resume's
                     saved overrides (a run directory is data, never code)
    composing.py     `prepare_hydra` (the schemas, once), Hydra's compose API, `validate`
    resuming.py      what `resume=` names on the command line
    init_from.py     model.init_from's family and shape
    folders.py       what a --config-dir folder may add (no Hydra settings)
    outputs.py       where Hydra will make the run's directory: makeable, what was there;
                     a single job's directory made and claimed before Hydra starts
    preflight.py     `arguments` and `preflight`: every job composed and validated
    job.py           the job Hydra runs: one run, handed to the runner
    summary.py       the sweep summary's Hydra callbacks
"""

from __future__ import annotations

from trainrun.composition.command_line import (
    checked_config_dir,
    config_dir_from_flags,
    is_sweep,
    override_value,
    split_flags,
    sweep,
    task_overrides,
)
from trainrun.composition.composing import hydra_configs, load, prepare_hydra, validated_configs
from trainrun.composition.explain import explain, fail
from trainrun.composition.overrides import options
from trainrun.composition.preflight import arguments, preflight

__all__ = ["arguments", "checked_config_dir", "config_dir_from_flags", "explain", "fail",
           "hydra_configs", "is_sweep", "load", "options", "override_value", "preflight",
           "prepare_hydra", "split_flags", "sweep", "task_overrides", "validated_configs"]
