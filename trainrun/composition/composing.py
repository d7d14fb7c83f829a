"""Composing a config: Hydra's compose API over trainrun's configs (and the folder
`--config-dir` adds), then the schemas' types and keys, then config.validate.

`prepare_hydra()` puts what composition needs into Hydra and OmegaConf (the schemas, the
`${trainrun.gpus:}` resolver); the commands call it, and so does every composition here,
rather than an import doing it by the way. It may be called any number of times."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainrun.composition.explain import explain
from trainrun.composition.overrides import CONF
from trainrun.config import Config, register_schemas, to_config, validate

_registered = False


def gpus() -> int:
    """`${trainrun.gpus:}` in a config: the CUDA GPUs this machine shows. The submitit
    preset gives each of its local jobs all of them, and each job takes one by its number
    (trainrun.devices), rather than none (gpus_per_node: 0 hid them, and jobs trained on
    the CPU)."""
    import torch

    return torch.cuda.device_count()


def prepare_hydra() -> None:
    """Register the schemas in Hydra's ConfigStore and the `trainrun.gpus` resolver in
    OmegaConf, once per process."""
    global _registered
    if _registered:
        return
    register_schemas()
    OmegaConf.register_new_resolver("trainrun.gpus", gpus, replace=True)
    _registered = True


def load(cfg: DictConfig, data: bool = True) -> Config:
    return validate(to_config(cfg), data)


def validated_configs(jobs: list[list[str]], data: bool = True,
            config_dir: Path | None = None) -> list[Config]:
    """The validated Config of each job's overrides, composed as `trainrun` composes them
    (data=False: without checking the data source, see config.validate)."""
    return [load(cfg, data) for cfg in hydra_configs(jobs, config_dir=config_dir)]


def hydra_configs(jobs: list[list[str]], with_hydra: bool = False,
             config_dir: Path | None = None) -> list[DictConfig]:
    """Each job's overrides composed (types, keys and options checked, no cross-field rule);
    with_hydra: Hydra's own config too, so that hydra/launcher=..., hydra.launcher.*=... and
    hparams_search=... are checked (a launcher or sweeper that is not installed, or a key
    it does not have). config_dir: the folder --config-dir adds to the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    prepare_hydra()
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
