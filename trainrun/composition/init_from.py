"""`model.init_from=FOLDER` takes the model from the folder: its family chooses the model
option when none is given, and its config.json gives the shape keys not given (those given
must agree with it)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import yaml

from trainrun.composition.command_line import is_sweep, override_value
from trainrun.composition.overrides import CONF, chosen, key, options
from trainrun.errors import ConfigError
from trainrun.models import MODELS, adapter_for, family_of, formats
from trainrun.models.hf import CONFIG_FILE, KEY, read_config

SCHEMA = re.compile(r"/?schemas/model/(\w+)(@_here_)?")  # a model option's first default


def option_family(option: str, config_dir: Path | None) -> str | None:
    """The family of model option `option` (its YAML file extends /schemas/model/<family>);
    None where no such option is found (composition then names the problem)."""
    for root in [*([config_dir] if config_dir else []), resources.files(CONF)]:
        path = root / "model" / f"{option}.yaml"
        if not path.is_file():
            continue
        try:
            defaults = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults")
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            return None
        found = [SCHEMA.fullmatch(d) for d in defaults or () if isinstance(d, str)]
        # schemas/model/model: the one schema before families, GPT-2's
        return next((m[1] if m[1] in MODELS else family_of("ModelConfig")
                     for m in found if m), None)
    return None


def family_options(family: str, config_dir: Path | None) -> list[str]:
    return [o for o in options("model", config_dir) if option_family(o, config_dir) == family]


def init_from_shape(overrides: list[str], config_dir: Path | None = None) -> list[str]:
    """The overrides with model.init_from's model added: `model=` the family's
    default_option where no option is given and the default is of another family, then
    the shape keys of its config.json, but for those given here, which must agree with it
    (ConfigError naming the key, the folder's value and the one given). Nothing is added for
    a resume of a run directory (its shape is its checkpoint's) nor a sweep over folders or
    models."""
    given = {key(o): o for o in overrides if "=" in o}  # the last of each key
    init_from = given.get(KEY)
    resumed = "resume" in given and override_value(given["resume"]) not in (None, "auto")
    if init_from is None or resumed or is_sweep(init_from) or (
            "model" in given and is_sweep(given["model"])):
        return overrides
    path = override_value(init_from)
    if path is None:
        return overrides
    folder, hf = read_config(str(path), f"a Hugging Face folder ({formats()})")
    found = adapter_for(hf.get("model_type"))
    if found is None:
        raise ConfigError(KEY, f"{folder / CONFIG_FILE}: model_type {hf.get('model_type')!r}; "
                               f"allowed: a Hugging Face folder of {formats()}")
    family, adapter = found
    option = chosen("model", overrides)
    added = []
    if option_family(option, config_dir) not in (family, None):
        if "model" in given:
            raise ConfigError(KEY, f"{path} holds a {adapter.architecture} (family {family}), "
                                   f"but model={option} is of another family; allowed: a model "
                                   f"of family {family} "
                                   f"({', '.join(family_options(family, config_dir))}), or no "
                                   f"model= (the folder's family chooses)")
        added.append(f"model={MODELS[family].default_option}")
    for k, value in adapter.shape(folder, hf).items():
        override = given.get(f"model.{k}")
        if override is None:
            added.append(f"model.{k}={str(value).lower() if type(value) is bool else value}")
        elif not is_sweep(override) and override_value(override) != value:
            raise ConfigError(f"model.{k}", f"got {override_value(override)!r}, but "
                                            f"{KEY}={path} holds a model with "
                                            f"{adapter.name_of(k, hf)} {value} ({CONFIG_FILE}); "
                                            f"allowed: {value}, or no model.{k} (the folder's "
                                            f"shape is taken)")
    return [*overrides, *added]
