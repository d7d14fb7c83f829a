"""Optimizers by name, with torch's parameter names, and their parameter groups (SPEC §5).

`optimizer=<name>` picks one of OPTIMIZERS; `lr` is the base (peak) rate that the schedule
scales. Parameter groups come from trainrun.model.parameter_kinds: weight decay is kept off
the kinds named in `no_decay` (by default biases, norm gains and embeddings), and LARS
leaves the kinds in its `exclude` (biases and norm gains) without a trust ratio. torch's
fused kernels are used where torch has one for the optimizer on the device, else the
foreach (multi-tensor) ones; LARS and LAMB (trainrun.layerwise) are foreach throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.layerwise import LAMB, LARS
from trainrun.model import KINDS, parameter_kinds


def require_fraction(key: str, value: float, *, allow_one: bool = False) -> None:
    """0 <= value < 1 (or <= 1 with allow_one): momentum, betas, alpha, dampening."""
    ok = math.isfinite(value) and 0 <= value and (value <= 1 if allow_one else value < 1)
    if not ok:
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(key, f"got {value}; allowed: 0 <= {name} {'<=' if allow_one else '<'} 1")


@dataclass
class OptimizerConfig:
    lr: float = MISSING  # the base (peak) learning rate
    weight_decay: float = MISSING
    no_decay: list[str] = MISSING  # parameter kinds without weight decay: bias, norm, embedding

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


@dataclass
class AdamWConfig(OptimizerConfig):
    """torch.optim.AdamW: decoupled weight decay."""

    betas: tuple[float, float] = MISSING  # [beta1, beta2]
    eps: float = MISSING

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if len(self.betas) != 2:
            raise ConfigError(f"{prefix}.betas", f"got {list(self.betas)}; allowed: [beta1, beta2]")
        for i, beta in enumerate(self.betas):
            require_fraction(f"{prefix}.betas[{i}]", beta)
        require_positive(f"{prefix}.eps", self.eps)

    def build(self, groups, device):
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                 weight_decay=self.weight_decay,
                                 **kernel_options(torch.optim.AdamW, device))


@dataclass
class AdamConfig(AdamWConfig):
    """torch.optim.Adam: weight decay is L2, added to the gradient (not decoupled)."""

    def build(self, groups, device):
        return torch.optim.Adam(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                weight_decay=self.weight_decay,
                                **kernel_options(torch.optim.Adam, device))


@dataclass
class SGDConfig(OptimizerConfig):
    """Plain SGD (momentum 0)."""

    def build(self, groups, device):
        return torch.optim.SGD(groups, lr=self.lr, weight_decay=self.weight_decay,
                               **kernel_options(torch.optim.SGD, device))


@dataclass
class MomentumConfig(OptimizerConfig):
    """SGD with (heavy-ball) momentum: buf ← momentum · buf + (1 − dampening) · g."""

    momentum: float = MISSING
    dampening: float = MISSING

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_fraction(f"{prefix}.momentum", self.momentum)
        require_fraction(f"{prefix}.dampening", self.dampening, allow_one=True)

    def build(self, groups, device):
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum,
                               dampening=self.dampening, weight_decay=self.weight_decay,
                               **kernel_options(torch.optim.SGD, device))


@dataclass
class NesterovConfig(OptimizerConfig):
    """SGD with Nesterov momentum (torch: nesterov=True, dampening 0)."""

    momentum: float = MISSING  # > 0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_fraction(f"{prefix}.momentum", self.momentum)
        if self.momentum == 0:
            raise ConfigError(f"{prefix}.momentum",
                              "got 0; Nesterov momentum needs 0 < momentum < 1 "
                              "(use optimizer=sgd for none)")

    def build(self, groups, device):
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=True,
                               weight_decay=self.weight_decay,
                               **kernel_options(torch.optim.SGD, device))


@dataclass
class AdagradConfig(OptimizerConfig):
    lr_decay: float = MISSING
    initial_accumulator_value: float = MISSING
    eps: float = MISSING

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_positive(f"{prefix}.lr_decay", self.lr_decay, allow_zero=True)
        require_positive(f"{prefix}.initial_accumulator_value", self.initial_accumulator_value,
                         allow_zero=True)
        require_positive(f"{prefix}.eps", self.eps)

    def build(self, groups, device):
        return torch.optim.Adagrad(groups, lr=self.lr, lr_decay=self.lr_decay,
                                   weight_decay=self.weight_decay, eps=self.eps,
                                   initial_accumulator_value=self.initial_accumulator_value,
                                   **kernel_options(torch.optim.Adagrad, device))


@dataclass
class RMSpropConfig(OptimizerConfig):
    alpha: float = MISSING  # smoothing of the squared-gradient average
    eps: float = MISSING
    momentum: float = MISSING
    centered: bool = MISSING

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_fraction(f"{prefix}.alpha", self.alpha)
        require_positive(f"{prefix}.eps", self.eps)
        require_fraction(f"{prefix}.momentum", self.momentum)

    def build(self, groups, device):
        return torch.optim.RMSprop(groups, lr=self.lr, alpha=self.alpha, eps=self.eps,
                                   weight_decay=self.weight_decay, momentum=self.momentum,
                                   centered=self.centered,
                                   **kernel_options(torch.optim.RMSprop, device))


@dataclass
class LARSConfig(OptimizerConfig):
    """trainrun.layerwise.LARS: SGD with momentum and a per-tensor trust ratio."""

    momentum: float = MISSING
    trust_coef: float = MISSING
    exclude: list[str] = MISSING  # kinds stepped without the trust ratio: bias, norm

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_fraction(f"{prefix}.momentum", self.momentum)
        require_positive(f"{prefix}.trust_coef", self.trust_coef)
        for kind in self.exclude:
            require_in(f"{prefix}.exclude", kind, KINDS)

    def group_options(self, kind):
        return super().group_options(kind) | {"lars_exclude": kind in self.exclude}

    def build(self, groups, device):
        return LARS(groups, lr=self.lr, momentum=self.momentum,
                    weight_decay=self.weight_decay, trust_coef=self.trust_coef)


@dataclass
class LAMBConfig(AdamWConfig):
    """trainrun.layerwise.LAMB: Adam moments with a per-tensor trust ratio."""

    def build(self, groups, device):
        return LAMB(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                    weight_decay=self.weight_decay)


OPTIMIZERS = {
    "adamw": AdamWConfig,
    "adam": AdamConfig,
    "sgd": SGDConfig,
    "momentum": MomentumConfig,
    "nesterov": NesterovConfig,
    "adagrad": AdagradConfig,
    "rmsprop": RMSpropConfig,
    "lars": LARSConfig,
    "lamb": LAMBConfig,
}


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """The trainable parameters, grouped by `cfg.group_options(kind)`: for most optimizers
    two groups, with weight decay and without (the kinds in cfg.no_decay), the decayed
    group first; LARS splits them further by `lars_exclude`."""
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


def kernel_options(optimizer_cls: type, device: torch.device) -> dict:
    """fused=True where torch has a fused kernel for this optimizer on this device, else
    foreach=True."""
    if device.type in FUSED_DEVICES.get(optimizer_cls, ()):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module,
                    device: torch.device) -> torch.optim.Optimizer:
    return cfg.build(param_groups(model, cfg), device)
