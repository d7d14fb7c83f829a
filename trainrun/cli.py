"""The `trainrun` command: the only module that touches Hydra.

Before Hydra creates a run directory, the overrides of a single run are composed and
validated here ("preflight"), so that bad input gets one line, `trainrun: error: <key>:
<what is wrong and what is allowed>`, exit status 2, and nothing on disk changes.
"""

from __future__ import annotations

import math
import sys
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainrun.config import Config, register_schemas, to_config, validate
from trainrun.errors import ConfigError
from trainrun.resume import WARMUP_KEYS

CONF = "trainrun.conf"

register_schemas()


def options(group: str) -> list[str]:
    """The options of a config group, as conf/<group>/*.yaml names them."""
    folder = resources.files(CONF) / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def explain(exc: Exception) -> ConfigError:
    """A Hydra/OmegaConf composition error as one ConfigError line."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, OverrideParseException):
        return ConfigError("override", str(exc).splitlines()[0].replace("Error parsing ", ""))
    if isinstance(exc, MissingConfigException):
        missing = (exc.missing_cfg_file or "").strip("/")
        if "/" in missing:
            group, option = missing.split("/", 1)
            return ConfigError(group, f"unknown option {option!r}; allowed: {', '.join(options(group))}")
        return ConfigError("config", str(exc).splitlines()[0])
    cause = exc.__cause__ or exc
    key = getattr(cause, "full_key", None) or "config"
    schema = getattr(cause, "object_type", None)
    text = str(cause).splitlines()[0]
    if " not in " in text and schema is not None:
        import dataclasses

        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        return ConfigError(key, f"unknown key; allowed keys here: {allowed}")
    return ConfigError(key, text)


def load(cfg: DictConfig) -> Config:
    return validate(to_config(cfg))


def preflight(argv: list[str]) -> None:
    """Compose and validate a single run's overrides; raise ConfigError if they are bad.

    Multirun jobs and Hydra's informational flags (--help, --cfg, ...) are left to Hydra;
    each multirun job validates itself when it starts.
    """
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module(config_module=CONF, version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as exc:
        raise explain(exc) from None
    config = load(cfg)
    from trainrun.runner import prepare

    prepare(config)  # the device and precision this machine can run
    if config.resume is not None:
        from trainrun import resume

        run_dir = next((Path(a.split("=", 1)[1]) for a in reversed(argv)
                        if a.startswith("hydra.run.dir=")), None)
        if run_dir is not None or config.resume != "auto":
            resume.locate(config, run_dir or Path(config.resume))


def fail(error: ConfigError) -> None:
    print(f"trainrun: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="pkg://trainrun.conf", config_name="config")
def _job(cfg: DictConfig) -> float:
    """One run; in a sweep, returns its best validation loss (inf if it failed) to Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainrun import runner

    hc = HydraConfig.get()
    in_sweep = hc.mode == RunMode.MULTIRUN
    try:
        config = load(cfg)
        choices = {g: o for g, o in hc.runtime.choices.items() if not g.startswith("hydra")}
        summary = runner.run(config, Path(hc.runtime.output_dir), OmegaConf.to_yaml(cfg), choices)
    except ConfigError as error:
        if not in_sweep:
            fail(error)
        print(f"trainrun: error: {error} (job {hc.job.num}; the sweep goes on)", file=sys.stderr)
        return math.inf
    except runner.RunStopped as stop:
        if not in_sweep or stop.code != 1:  # a signal stops the whole sweep
            raise
        return math.inf
    return summary["best_val_loss"]


def resume_argv(argv: list[str]) -> list[str]:
    """`resume=<run dir>` continues that run: its saved overrides, then these."""
    from trainrun import resume

    value = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("resume=")), None)
    if value in (None, "null", "auto") or any(a.startswith("-") for a in argv):
        return argv
    run_dir = Path(value).expanduser().resolve()
    if not (run_dir / "checkpoints").is_dir():
        raise ConfigError("resume", f"{value}: no checkpoints/ in that directory; allowed: "
                                    f"a run directory with a checkpoint, auto, or null")
    return resume.argv_for(run_dir, argv)


def one_warmup_key(argv: list[str]) -> list[str]:
    """Giving warmup_steps on the command line replaces the option's default warmup_ratio,
    and vice versa; giving both stays an error (validate() reports it)."""
    given = {k for k in WARMUP_KEYS for a in argv if a.lstrip("+").startswith(k + "=")}
    if len(given) != 1:
        return argv
    (other,) = set(WARMUP_KEYS) - given
    return [*argv, f"{other}=null"]


def arguments(argv: list[str]) -> list[str]:
    """The overrides `trainrun argv` runs with: a resumed run's saved ones first, and one
    warmup key replacing the other."""
    return one_warmup_key(resume_argv(argv))


def main() -> None:
    try:
        sys.argv[1:] = arguments(sys.argv[1:])
        preflight(sys.argv[1:])
    except ConfigError as error:
        fail(error)
    _job()


if __name__ == "__main__":
    main()
