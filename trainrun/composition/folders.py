"""What a `--config-dir` folder may add: options of trainrun's groups, which set trainrun's
keys, never Hydra's own settings.

Where runs go, callbacks, the launcher, logging and `hydra.job.*` come from the command line,
where pre-flight sees and checks them before anything is written; an option of the folder
that changed one (a `# @package _global_` file with a `hydra:` section, a defaults entry of
a hydra/ group) would act behind pre-flight's back, so it is refused in one line, as is a
hydra/ subfolder. One exception: an `hparams_search` option, a search's preset, may set the
sweeper and hydra.mode, as trainrun's own `optuna` does.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainrun.composition.composing import hydra_configs
from trainrun.composition.overrides import groups, key, options
from trainrun.errors import ConfigError

# what composing a job's own overrides changes in Hydra's config: records, not settings
RECORDS = ("runtime.", "overrides.", "job.override_dirname")
SEARCH = ("sweeper", "mode")  # what an hparams_search option of the folder may set


def check(folder: Path, jobs: list[list[str]], hydra_own: list[str]) -> None:
    """ConfigError if the folder holds options of Hydra's own groups, or if one of its options
    that a job chooses sets a key of Hydra's (jobs: each job's task overrides; hydra_own:
    the command line's hydra.* overrides and hydra/ choices, which are the user's)."""
    allowed = (f"allowed: options of trainrun's groups ({', '.join(groups())}) that set "
               f"trainrun's keys; Hydra's settings go on the command line (hydra.run.dir=..., "
               f"hydra/launcher=...)")
    if (folder / "hydra").is_dir():
        raise ConfigError("--config-dir", f"{folder / 'hydra'}: options of Hydra's own "
                                          f"groups; {allowed}")
    without: dict[tuple[str, ...], dict] = {}  # Hydra's settings without the folder
    # only a group's option can bring Hydra's settings: one job per choice of options
    distinct = {tuple(o for o in job if "." not in key(o)): job for job in jobs}
    for job in distinct.values():
        # trainrun's own search presets set Hydra's sweeper: the same with or without
        searches = tuple(o for o in job if key(o) == "hparams_search"
                         and o.partition("=")[2] in options("hparams_search"))
        if searches not in without:
            without[searches] = settings(hydra_configs([[*hydra_own, *searches]], with_hydra=True)[0])
        config = hydra_configs([[*hydra_own, *job]], with_hydra=True, config_dir=folder)[0]
        before, after = without[searches], settings(config)
        changed = sorted(k for k in before.keys() | after.keys()
                         if before.get(k, MISSING) != after.get(k, MISSING))
        theirs = {g: o for g, o in config.hydra.runtime.choices.items()
                  if o is not None and o not in options(g) and o in options(g, folder)}
        if "hparams_search" in theirs:  # a search preset of the folder's
            changed = [k for k in changed if k.split(".")[0] not in SEARCH]
        if changed:
            chosen = ", ".join(f"{g}={o}" for g, o in theirs.items()) or "an option"
            raise ConfigError("--config-dir", f"{chosen} of {folder} sets hydra.{changed[0]}, "
                                              f"one of Hydra's own settings; {allowed}")


MISSING = object()


def settings(config: DictConfig) -> dict[str, object]:
    """Hydra's settings in a composed config (its `hydra` node), flat by dotted key,
    unresolved, without what the job's overrides record there."""
    flat: dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", OmegaConf.to_container(config.hydra, resolve=False))
    return {k: v for k, v in flat.items() if not k.startswith(RECORDS)}
