"""What every optimizer option shares: the schema's base, its checks, the parameter groups
and the choice between torch's fused and foreach kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.models import KINDS, parameter_kinds


def require_fraction(key: str, value: float, *, allow_one: bool = False) -> None:
    """0 <= value < 1 (or <= 1 with allow_one): momentum, betas, alpha, dampening."""
    ok = math.isfinite(value) and 0 <= value and (value <= 1 if allow_one else value < 1)
    if not ok:
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(key, f"got {value}; allowed: 0 <= {name} {'<=' if allow_one else '<'} 1")


def require_betas(key: str, betas: Sequence[float]) -> None:
    """[beta1, beta2], each in [0, 1)."""
    if len(betas) != 2:
        raise ConfigError(key, f"got {list(betas)}; allowed: [beta1, beta2]")
    for i, beta in enumerate(betas):
        require_fraction(f"{key}[{i}]", beta)


@dataclass
class OptimizerConfig:
    lr: float = MISSING  # the base (peak) learning rate
    weight_decay: float = MISSING
    no_decay: list[str] = MISSING  # parameter kinds without weight decay: bias, norm, embedding

    schedulers: ClassVar[tuple[str, ...] | None] = None  # the scheduler options it takes: all
    shards: ClassVar[bool] = True  # steps FSDP's sharded parameters (trainer.strategy=fsdp)

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.lr", self.lr)
        require_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        for kind in self.no_decay:
            require_in(f"{prefix}.no_decay", kind, KINDS)

    def group_options(self, kind: str) -> dict:
        """The options of the parameter group that a parameter of this kind belongs to."""
        return {"weight_decay": 0.0} if kind in self.no_decay else {}

    def build(self, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
        raise NotImplementedError


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """The trainable parameters, grouped by `cfg.group_options(kind)`: for most optimizers
    two groups, with weight decay and without (the kinds in cfg.no_decay), the decayed
    group first; LARS splits them further by `lars_exclude`, Muon by `muon`."""
    kinds = parameter_kinds(model)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            options = cfg.group_options(kinds[name])
            key = tuple(sorted(options.items()))
            groups.setdefault(key, {"params": [], **options})["params"].append(p)
    return sorted(groups.values(), key=lambda group: "weight_decay" in group)


# Devices on which torch (>= 2.4) has a fused kernel for the optimizer.
FUSED_DEVICES = {
    torch.optim.Adam: {"cuda", "cpu", "mps", "xpu"},
    torch.optim.AdamW: {"cuda", "cpu", "mps", "xpu"},
    torch.optim.SGD: {"cuda", "cpu", "mps", "xpu"},
    torch.optim.Adagrad: {"cuda", "cpu"},
}


def kernel_options(optimizer_cls: type, device: torch.device, momentum: bool = False) -> dict:
    """fused=True where torch has a fused kernel for this optimizer on this device, else
    foreach=True. SGD with momentum always takes foreach: torch's fused SGD makes its
    momentum buffers without filling them, and when fp16's loss scaler skips the first
    update (its kernel then writes nothing) the next one reads garbage and the weights
    blow up."""
    if optimizer_cls is torch.optim.SGD and momentum:
        return {"foreach": True}
    if device.type in FUSED_DEVICES.get(optimizer_cls, ()):
        return {"fused": True}
    return {"foreach": True}


# Where the parameters are sharded (FSDP's DTensors), the foreach kernels: torch has no
# sharding rule for most fused ones. Named as a device on which no fused kernel exists.
SHARDED = torch.device("meta")
