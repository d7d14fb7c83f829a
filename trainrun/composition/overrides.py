"""Override lists (`key=value`, Hydra's grammar): the option each group chooses, the "one of
these keys" pairs, and what a resume takes from a run directory.

A run directory is data, not code: `resume=<dir>` takes from its .hydra/overrides.yaml only
trainrun's own task keys with plain values. Anything that would reach Hydra itself (`hydra.*`,
`+`/`++`/`~` edits, `@package`, sweeps) or OmegaConf's resolvers (`${...}`) is refused with one
line, before anything is composed, run or written.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from trainrun.config import GROUPS, Config, TrainerConfig
from trainrun.errors import ConfigError
from trainrun.resume import earlier, quote

CONF = "trainrun.conf"
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))  # model, data, ..., resume
OWN = ("resume", "hydra.run.dir")  # what trainrun itself adds when it continues a run
# what a resume never takes from a run directory: a file to start from (the checkpoint
# holds the weights, and meta.json records where they first came from)
NOT_TAKEN = ("model.init_from",)


def options(group: str, config_dir: Path | None = None) -> list[str]:
    """The options of a config group, as conf/<group>/*.yaml names them, and the folder
    --config-dir adds (config_dir/<group>/*.yaml)."""
    folders = [resources.files(CONF) / group, *([config_dir / group] if config_dir else [])]
    return sorted({p.name[: -len(".yaml")] for folder in folders if folder.is_dir()
                   for p in folder.iterdir() if p.name.endswith(".yaml")})


def groups() -> list[str]:
    """The config groups: the folders of conf/ (but hydra/, which holds presets of Hydra's
    own groups, chosen as hydra/<group>=<option>)."""
    return sorted(p.name for p in resources.files(CONF).iterdir()
                  if p.is_dir() and not p.name.startswith("_") and p.name != "hydra")


def default_options() -> dict[str, str]:
    """Each group's default option, from conf/config.yaml's defaults list."""
    import yaml

    text = (resources.files(CONF) / "config.yaml").read_text()
    return {group: option for entry in yaml.safe_load(text)["defaults"] if isinstance(entry, dict)
            for group, option in entry.items() if group in groups()}


def key(override: str) -> str:
    """The dotted key or group an override names, without +, ++, ~ or @package."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def chosen(group: str, overrides: list[str]) -> str:
    """The option of `group` that these overrides select (the last one given wins)."""
    picks = [o.split("=", 1)[1] for o in overrides if "=" in o and key(o) == group]
    return picks[-1] if picks else default_options()[group]


def pairs(overrides: list[str]) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(group, side, other side) for each "one of these keys" pair of the chosen options."""
    found = []
    for group, registry in GROUPS.items():
        schema = registry.get(chosen(group, overrides))
        for side, other in getattr(schema, "one_of", ()):
            found += [(group, side, other), (group, other, side)]
    return found


def named(overrides: list[str], group: str, keys: tuple[str, ...]) -> bool:
    return any(key(o) in {f"{group}.{k}" for k in keys} for o in overrides)


def one_of(overrides: list[str]) -> list[str]:
    """Naming one side of a pair sets the other side to null, replacing the option's default
    (scheduler.decay_rate=0.5 alone selects exponential's decay_rate form); naming both is
    left to validate(), which reports it."""
    nulls = [f"{group}.{k}=null" for group, side, other in pairs(overrides)
             if named(overrides, group, side) and not named(overrides, group, other)
             for k in other]
    # a deprecated key named alone nulls the key it is a form of (null itself unless named)
    nulls += [f"trainer.{new}=null" for old, new in TrainerConfig.deprecated.items()
              if named(overrides, "trainer", (old,)) and not named(overrides, "trainer", (new,))]
    return [*overrides, *nulls]


def saved(run_dir: Path, config_dir: Path | None = None) -> list[str]:
    """The overrides a run directory recorded, each checked to be one of trainrun's own task
    keys with a plain value (a group's option one of trainrun's or config_dir's); raise
    ConfigError naming the file and the entry otherwise."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError("resume", f"{path}: not valid YAML ({str(exc).splitlines()[0]}); "
                                    f"allowed: a list of key=value overrides") from None
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError("resume", f"{path}: holds a {type(entries).__name__}; allowed: a list "
                                    f"of key=value overrides")
    # the search that chose this run's values (a job of `trainrun -m hparams_search=optuna`)
    # is not part of the run: dropped, never used
    entries = [e for e in entries if not (isinstance(e, str) and key(e) == "hparams_search")]
    for entry in entries:
        problem = _refusal(entry, config_dir)
        if problem is not None and problem.endswith(OPTION):
            raise ConfigError("resume", f"{path}: entry {entry!r}: {problem}{_hint(run_dir)}")
        if problem is not None:
            raise ConfigError("resume", f"{path}: entry {entry!r} refused: {problem}; a run "
                                        f"directory may hold only trainrun's own keys with plain "
                                        f"values (nothing was run or written)")
    return entries


OPTION = "is not an option of trainrun's configs or of --config-dir's"


def recorded_config_dir(run_dir: Path) -> str | None:
    """The folder the run was started with `--config-dir`, as its .hydra/hydra.yaml records
    it (read to name it in a message only: a run directory never chooses a config folder)."""
    import yaml

    try:
        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text(encoding="utf-8"))
        return added_config_dir(hydra["hydra"]["runtime"]["config_sources"])
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None


def added_config_dir(sources) -> str | None:
    """The folder `--config-dir` added, among Hydra's config sources (its
    hydra.runtime.config_sources: dicts of path, schema and provider)."""
    return next((s["path"].removeprefix("file://") for s in sources
                 if s.get("provider") == "command-line"), None)


def _hint(run_dir: Path) -> str:
    from trainrun.resume import command

    folder = recorded_config_dir(run_dir)
    if folder is None:
        return "; allowed: the options of trainrun's configs (nothing was run or written)"
    return (f"; the run was started with --config-dir {folder}: allowed: the same "
            f"--config-dir, as in `{command(run_dir, folder)}` (nothing was run or written)")


def _refusal(entry: object, config_dir: Path | None = None) -> str | None:
    """Why a recorded override may not be used, or None if it may."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    if not isinstance(entry, str):
        return "not a key=value string"
    if "${" in entry:
        return "interpolations and resolvers are not taken from a run directory"
    try:
        override = OverridesParser.create().parse_override(entry)
    except Exception:
        return "not an override Hydra can parse"
    name = override.key_or_group
    if override.type != OverrideType.CHANGE or override.package is not None:
        return "only key=value, no +, ++, ~ or @package"
    if name.split(".")[0].split("/")[0] not in SECTIONS:
        return f"not one of trainrun's keys ({', '.join(SECTIONS)}, and the keys under them)"
    if override.is_sweep_override():
        return "a sweep, not one value"
    if name in groups() and override.value() not in options(name, config_dir):
        return f"{override.value()!r} of {name} {OPTION}"
    return None


def continue_run(run_dir: Path, argv: list[str], config_dir: Path | None = None) -> list[str]:
    """The overrides that continue run_dir: the values of keys that came after it was
    recorded (resume.earlier), its saved ones, then the new ones (the last value of a key
    wins), then the run directory itself (config_dir: the --config-dir given now).

    A group switched to another option drops the saved keys of the old option; a key named
    anew drops the saved keys on the other side of its pair (warmup_steps replaces a saved
    warmup_ratio), as trainer.eval_sequences does a saved trainer.eval_batches (and back)."""
    old = [*earlier(run_dir),
           *(o for o in saved(run_dir, config_dir) if key(o) not in (*OWN, *NOT_TAKEN))]
    new = [a for a in argv if key(a) not in OWN]
    for group in groups():
        if any(key(a) == group for a in new) and chosen(group, new) != chosen(group, old):
            old = [o for o in old if key(o) != group and not key(o).startswith(f"{group}.")]
    for group, side, other in pairs([*old, *new]):
        if named(new, group, side):
            old = [o for o in old if not named([o], group, other)]
    for side, other in TrainerConfig.deprecated.items():
        for now, saved_other in ((side, other), (other, side)):
            if named(new, "trainer", (now,)):
                old = [o for o in old if not named([o], "trainer", (saved_other,))]
    merged: dict[str, str] = {}
    for override in [*old, *new]:
        merged.pop(key(override), None)
        merged[key(override)] = override
    return [*merged.values(), f"resume={quote(str(run_dir))}",
            f"hydra.run.dir={quote(str(run_dir))}"]
