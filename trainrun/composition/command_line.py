"""The command line as Hydra reads it: its flags (with their values) apart from the
overrides, the overrides that compose the task config, one override's value, a sweep's
jobs, and the folder `--config-dir` names."""

from __future__ import annotations

import os
from pathlib import Path

from trainrun.composition.explain import explain
from trainrun.errors import ConfigError

# Hydra's flags that take a value, and --info's optional one
VALUED_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                "-cn", "--config-dir", "-cd", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
# Hydra's flags that run or print the config trainrun composes (with --cfg's value), and
# the one that adds options to it
PRINTING = ("-m", "--multirun", "--cfg", "-c", "--resolve", "--package", "-p", "job", "hydra",
            "all")
CONFIG_DIR = ("--config-dir", "-cd")


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


def composing_only(flags: list[str]) -> bool:
    """No flag, or only those that run or print the composed config or add a config folder,
    with their values."""
    return all(f in PRINTING or f.partition("=")[0] in CONFIG_DIR
               or not f.startswith("-") and flags[i - 1] in ("--package", "-p", *CONFIG_DIR)
               for i, f in enumerate(flags))


def runs_one_job(argv: list[str]) -> bool:
    """Whether `trainrun argv` runs a single job (not a sweep, nor a printed config)."""
    flags, _ = split_flags(argv)
    return not any(f in ("-m", "--multirun") for f in flags) and composing_only(flags) \
        and not any(f in PRINTING for f in flags)


def task_overrides(argv: list[str]) -> list[str]:
    """The overrides that compose the task config: no flags, nothing of Hydra's own."""
    return [a for a in argv if not a.startswith("-")
            and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]


def override_value(override: str):
    """The value of one override as Hydra reads it (quotes and escapes undone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception as exc:
        raise explain(exc) from None


def is_sweep(override: str) -> bool:
    """A sweep in Hydra's grammar: a,b  choice(...)  range(...)  interval(...)  tag(...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception as exc:
        raise explain(exc) from None


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


def config_dir_args(args: list[str]) -> list[str]:
    """The `--config-dir DIR` (-cd) among args, as given: [--config-dir=DIR] or
    [--config-dir, DIR] (a resume must be given it again); [] if none."""
    found = []
    for i, arg in enumerate(args):
        if arg.partition("=")[0] in CONFIG_DIR:
            found = [arg] if "=" in arg else args[i:i + 2]
    return found


def config_dir_from_flags(flags: list[str]) -> Path | None:
    """The folder `--config-dir` (-cd) names, made absolute as Hydra makes it; ConfigError if
    it is not a folder."""
    words = config_dir_args(flags)
    value = words[1] if len(words) == 2 else "".join(words).partition("=")[2]
    return checked_config_dir(value) if value else None


def checked_config_dir(given: str) -> Path:
    """A --config-dir value as an absolute path; ConfigError if it is not a folder."""
    folder = Path(os.path.abspath(given))
    if not folder.is_dir():
        raise ConfigError("--config-dir", f"{given}: no such folder; allowed: a folder of "
                                          f"config groups (model/<option>.yaml, ...)")
    return folder
