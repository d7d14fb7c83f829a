"""The one-line errors of every command: a Hydra or OmegaConf composition error turned into
a ConfigError (`<key>: <what is wrong and what is allowed>`), and `fail`, which prints it
as `<prog>: error: <line>` and exits with status 2."""

from __future__ import annotations

import dataclasses
import re
import sys

from trainrun.composition.overrides import options
from trainrun.errors import ConfigError

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
    if " not in " in text and dataclasses.is_dataclass(schema):  # not a plain dict's
        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        return ConfigError(key, f"unknown key; allowed keys here: {allowed}")
    return ConfigError(key, text)


def fail(error: ConfigError, prog: str = "trainrun") -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)
