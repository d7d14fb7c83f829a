"""The `trainrun` command: the only package that touches Hydra.

Before Hydra creates a run directory, the overrides of a single run are composed and
validated here ("preflight"), so that bad input gets one line, `trainrun: error: <key>:
<what is wrong and what is allowed>`, exit status 2, and nothing on disk changes. Hydra
writes nothing into a run directory itself (`hydra.output_subdir: null` in conf/config.yaml):
the run writes .hydra/ once it has really started, so a refused or failed start changes no file.

    overrides.py  override lists: group options, "one of these keys" pairs, resume's
                  saved overrides (a run directory is data, never code)
    help.py       `trainrun --help`
    resuming.py   what `resume=` names on the command line
    summary.py    the sweep summary's Hydra callbacks
    outputs.py    where Hydra will make the run's directory: makeable, and what was there
    folders.py    what a --config-dir folder may add (no Hydra settings)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainrun import distributed, identical, launch, memory, rundir, signals
from trainrun.cli import folders, outputs
from trainrun.cli.init_from import init_from_shape
from trainrun.cli.overrides import CONF, added_config_dir, key, one_of, options
from trainrun.cli.resuming import finished_loss, resume_argv
from trainrun.config import Config, register_schemas, to_config, validate
from trainrun.errors import ConfigError
from trainrun.launch import sweep_command
from trainrun.resume import AlreadyComplete, quote

__all__ = ["arguments", "compose", "fail", "load", "main", "options", "preflight", "sweep",
           "task_overrides"]

register_schemas()


def gpus() -> int:
    """`${trainrun.gpus:}` in a config: the CUDA GPUs this machine shows. The submitit
    preset gives each of its local jobs all of them, and each job takes one by its number
    (trainrun.devices), rather than none (gpus_per_node: 0 hid them, and jobs trained on
    the CPU)."""
    import torch

    return torch.cuda.device_count()


OmegaConf.register_new_resolver("trainrun.gpus", gpus, replace=True)

PLUGINS = ("Hydra's joblib and submitit launchers and Optuna sweeper come with "
           "pip install 'trainrun[sweep]'")


def explain(exc: Exception) -> ConfigError:
    """A Hydra/OmegaConf composition error as one ConfigError line."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, OverrideParseException):
        return ConfigError("override", str(exc).splitlines()[0].replace("Error parsing ", ""))
    if isinstance(exc, MissingConfigException):
        missing = (exc.missing_cfg_file or "").strip("/")
        if missing.startswith("hydra/") and missing.count("/") >= 2:
            group, option = missing.rsplit("/", 1)
            if not exc.options:  # a preset of ours extends it (hydra/launcher=parallel)
                return ConfigError(group, f"{option!r} is not installed; {PLUGINS}")
            return ConfigError(group, f"unknown option {option!r}; allowed: "
                                      f"{', '.join(exc.options)} ({PLUGINS})")
        if "/" in missing:
            group, option = missing.split("/", 1)
            allowed = exc.options or options(group)  # Hydra's: --config-dir's options too
            return ConfigError(group, f"unknown option {option!r}; allowed: {', '.join(allowed)}")
        return ConfigError("config", str(exc).splitlines()[0])
    ambiguous = re.match(r"Ambiguous value for argument '([\w.]+)=(.*)'", str(exc))
    if ambiguous:  # a comma-separated value outside -m: Hydra's sweep syntax
        key, value = ambiguous.groups()
        return ConfigError(key, f"{value!r} is a sweep over {value.count(',') + 1} values (-m "
                                f"runs one job each); allowed: one value, or a list in brackets "
                                f"and quotes, {key}='[{value}]'")
    cause = exc.__cause__ or exc
    key = getattr(cause, "full_key", None) or "config"
    schema = getattr(cause, "object_type", None)
    text = str(cause).splitlines()[0]
    if " not in " in text and schema is not None:
        import dataclasses

        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        return ConfigError(key, f"unknown key; allowed keys here: {allowed}")
    return ConfigError(key, text)


def load(cfg: DictConfig, data: bool = True) -> Config:
    return validate(to_config(cfg), data)


def task_overrides(argv: list[str]) -> list[str]:
    """The overrides that compose the task config: no flags, nothing of Hydra's own."""
    return [a for a in argv if not a.startswith("-")
            and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]


def sweep(overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """Each job's overrides as Hydra's basic sweeper expands them (the cartesian product of
    comma-separated values), and the keys that are swept."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        jobs = BasicSweeper.split_arguments(parsed, None)[0] if swept else [overrides]
    except Exception as exc:
        raise explain(exc) from None
    return [list(job) for job in jobs], swept


def is_sweep(override: str) -> bool:
    """A sweep in Hydra's grammar: a,b  choice(...)  range(...)  interval(...)  tag(...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception as exc:
        raise explain(exc) from None


def compose(jobs: list[list[str]], data: bool = True,
            config_dir: Path | None = None) -> list[Config]:
    """The validated Config of each job's overrides, composed as `trainrun` composes them
    (data=False: without checking the data source, see config.validate)."""
    return [load(cfg, data) for cfg in composed(jobs, config_dir=config_dir)]


def composed(jobs: list[list[str]], with_hydra: bool = False,
             config_dir: Path | None = None) -> list[DictConfig]:
    """Each job's overrides composed (types, keys and options checked, no cross-field rule);
    with_hydra: Hydra's own config too, so that hydra/launcher=..., hydra.launcher.*=... and
    hparams_search=... are checked (a launcher or sweeper that is not installed, or a key
    it does not have). config_dir: the folder --config-dir adds to the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    configs = []
    with initialize_config_module(config_module=CONF, version_base=None):
        if config_dir is not None:
            search(config_dir)
        for overrides in jobs:
            try:
                configs.append(hydra_compose(config_name="config", overrides=overrides,
                                             return_hydra_config=with_hydra))
            except Exception as exc:
                raise explain(exc) from None
    return configs


def search(config_dir: Path) -> None:
    """Make Hydra's global instance search config_dir too, where and as `--config-dir` puts
    it: after trainrun's own configs (which it adds options to), before the schemas."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    path = create_automatic_config_search_path(None, f"{CONF}.app", None)
    path.prepend(provider="command-line", path=f"file://{config_dir}",
                 anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2("app", path)


def config_dir(flags: list[str]) -> Path | None:
    """The folder `--config-dir` (-cd) names, made absolute as Hydra makes it; ConfigError if
    it is not a folder."""
    words = launch.config_dir(flags)  # [--config-dir=DIR] or [--config-dir, DIR]
    value = words[1] if len(words) == 2 else "".join(words).partition("=")[2]
    return config_folder(value) if value else None


def config_folder(given: str) -> Path:
    """A --config-dir value as an absolute path; ConfigError if it is not a folder."""
    folder = Path(os.path.abspath(given))
    if not folder.is_dir():
        raise ConfigError("--config-dir", f"{given}: no such folder; allowed: a folder of "
                                          f"config groups (model/<option>.yaml, ...)")
    return folder


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
    folder = config_dir(flags)
    overrides = task_overrides(argv)
    searches = [a for a in overrides if key(a) == "hparams_search" and not a.endswith("=null")]
    hydra_own = [a for a in argv if not a.startswith("-") and a not in overrides]
    if hydra_own or searches:
        composed([[*hydra_own, *searches]], with_hydra=True, config_dir=folder)
    if not any(f in ("--cfg", "-c") for f in flags):  # a run: Hydra will make its directory
        outputs.check([*flags, *argv])
    if searches or any(key(a) == "hydra/sweeper" and not a.endswith("=basic") for a in argv):
        # another sweeper: its jobs are known only as it runs them, each validated as it
        # starts; the values that every job shares are composed here
        shared = [o for o in overrides if not is_sweep(o)]
        composed([shared], config_dir=folder)
        if folder is not None:
            folders.check(folder, [shared], hydra_own)
        return []
    jobs, swept = sweep(overrides) if multirun else ([overrides], set())
    if folder is not None:
        folders.check(folder, jobs, hydra_own)
    from trainrun.runner import prepare

    run_dir = next((Path(override_value(a)) for a in reversed(argv)
                    if a.startswith("hydra.run.dir=")), None)
    configs, modes = compose(jobs, config_dir=folder), []
    remote = any(key(a) == "hydra/launcher" and override_value(a) in REMOTE for a in argv)
    for config in configs:
        if remote:  # its GPUs and memory are the cluster's, not this host's
            modes.append(remote_mode(config))
            continue
        device, precision = prepare(config)  # the device and precision this machine can run
        modes.append(precision.mode)
        close = memory.check(config, device, distributed.launch_size())
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


# Launchers whose jobs run on other machines (a login node submits them)
REMOTE = ("slurm", "submitit_slurm")


def remote_mode(config: Config) -> str:
    """The precision a job on another machine may run in, as far as this host can tell:
    auto may be fp16 there (a GPU without bfloat16), so its loss scaler's keys count."""
    import torch

    from trainrun.precision import FP16Config

    if isinstance(config.precision, FP16Config):  # fp16, and auto
        return "fp16"
    return config.precision.mode(torch.device("cpu"))


def fail(error: ConfigError, prog: str = "trainrun") -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="pkg://trainrun.conf", config_name="config")
def _job(cfg: DictConfig) -> float:
    """One run; in a sweep, returns its best validation loss to Hydra, or if it failed
    (a bad value found while building it, too many non-finite updates, a crash) inf carrying
    the error's line, so that the sweep goes on (docs/sweeps.md, A failed job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainrun import runner
    from trainrun.sweep import JobFailed, NotRun, crashed, tb_name

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
                            hc.job.num if in_sweep else None)
        summary = runner.run(config, run_dir, OmegaConf.to_yaml(cfg), choices, job)
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


def override_value(override: str):
    """The value of one override as Hydra reads it (quotes and escapes undone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception as exc:
        raise explain(exc) from None


# Hydra's flags that take a value, and --info's optional one
VALUED_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                "-cn", "--config-dir", "-cd", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and the overrides, each in their order."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            flags.append(arg)
            valued = arg in VALUED_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv)
                                             and argv[i + 1] in INFO_TOPICS)
            if valued and i + 1 < len(argv):
                i += 1
                flags.append(argv[i])
        i += 1
    return flags, overrides


def arguments(argv: list[str]) -> list[str]:
    """The arguments `trainrun argv` runs with: Hydra's flags, then the overrides (Hydra takes
    no override after a flag's value), a resumed run's saved ones first, one key of a
    "one of these keys" pair replacing the other, and model.init_from's shape."""
    flags, overrides = split_flags(argv)
    if composing_only(flags):  # other flags (--info, --config-path, ...): no resumable job
        searching = any(key(o) == "hparams_search" and not o.endswith("=null") for o in overrides)
        overrides = resume_argv(overrides, config_dir(flags),
                                sweep=searching or any(f in ("-m", "--multirun") for f in flags))
    return [*flags, *one_of(init_from_shape(overrides, config_dir(flags)))]


# Hydra's flags that run or print the config trainrun composes (with --cfg's value), and
# the one that adds options to it
PRINTING = ("-m", "--multirun", "--cfg", "-c", "--resolve", "--package", "-p", "job", "hydra",
            "all")
CONFIG_DIR = ("--config-dir", "-cd")


def composing_only(flags: list[str]) -> bool:
    """No flag, or only those that run or print the composed config or add a config folder,
    with their values."""
    return all(f in PRINTING or f.partition("=")[0] in CONFIG_DIR
               or not f.startswith("-") and flags[i - 1] in ("--package", "-p", *CONFIG_DIR)
               for i, f in enumerate(flags))


def main() -> None:
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        from trainrun.cli.help import usage

        print(usage())
        return
    try:
        sys.argv[1:] = arguments(sys.argv[1:])
        claim_given(sys.argv[1:])
        configs = preflight(sys.argv[1:])
        signals.check()  # a stop that came while torch was imported or a config composed
        outputs.record(sys.argv[1:])  # what exists where Hydra will make the run's directory
        sys.argv[1:] = one_run_dir(sys.argv[1:], configs)
    except ConfigError as error:
        fail(error)
    except AlreadyComplete as done:  # nothing to do, and nothing changed
        print(f"trainrun: {done}", file=sys.stderr)
        return
    _job()
    from trainrun.cli.summary import failures

    failed = failures()  # a sweep in which a job failed exits 1 (docs/sweeps.md)
    if failed is not None:
        print(f"trainrun: {failed}", file=sys.stderr)
        sys.exit(1)


def runs_one_job(argv: list[str]) -> bool:
    """Whether `trainrun argv` runs a single job (not a sweep, nor a printed config)."""
    flags, _ = split_flags(argv)
    return not any(f in ("-m", "--multirun") for f in flags) and composing_only(flags) \
        and not any(f in PRINTING for f in flags)


def given_run_dir(argv: list[str]) -> Path | None:
    """The run directory a single job's `hydra.run.dir=` names (resume=<dir> adds it)."""
    found = [a for a in argv if not a.startswith("-") and key(a) == "hydra.run.dir"]
    return Path(override_value(found[-1])) if found and runs_one_job(argv) else None


def claim_given(argv: list[str]) -> None:
    """Claim the run directory a single job names, when it exists already (a resume, a run
    into a fixed hydra.run.dir): no other process writes it from pre-flight to the end
    (rank 0 claims for a distributed launch). A new one is claimed as it is made."""
    run_dir = given_run_dir(argv)
    if run_dir is not None and run_dir.is_dir() and distributed.launch_rank() == 0:
        named = any(key(a) == "resume" and override_value(a) not in (None, "auto") for a in argv)
        rundir.claim(run_dir, "resume" if named else "hydra.run.dir")


def one_run_dir(argv: list[str], configs: list[Config]) -> list[str]:
    """A single job's run directory, made and claimed before Hydra starts: a fixed
    hydra.run.dir, else outputs/<date>/<time> (<time>-1, -2, ... when another run took that
    second). Under torchrun or srun every process joins the process group here, with the
    backend of the run's device (`configs`: the job's, from pre-flight), and takes rank 0's
    directory. A sweep's jobs join theirs when they run."""
    if any(a in ("-m", "--multirun") for a in argv):
        size = distributed.launch_size()
        if size > 1:
            raise ConfigError("--multirun", f"a sweep cannot run inside a distributed launch "
                                            f"({size} processes); allowed: a sweep whose jobs "
                                            f"are distributed (hydra/launcher=slurm)")
        return argv
    if configs:
        from trainrun.runner import prepare

        world = distributed.init(prepare(configs[0])[0])
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


if __name__ == "__main__":
    main()
