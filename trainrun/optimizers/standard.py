"""The optimizers taken from torch by name, with torch's parameter names, and the two
layer-wise ones implemented in the project (trainrun.optimizers.layerwise)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.models import KINDS
from trainrun.optimizers.base import (
    OptimizerConfig,
    kernel_options,
    require_betas,
    require_fraction,
)
from trainrun.optimizers.layerwise import LAMB, LARS
from trainrun.registry import register


@register("optimizer", "adamw")
@dataclass
class AdamWConfig(OptimizerConfig):
    """torch.optim.AdamW: decoupled weight decay."""

    betas: tuple[float, float] = MISSING  # [beta1, beta2]
    eps: float = MISSING

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_betas(f"{prefix}.betas", self.betas)
        require_positive(f"{prefix}.eps", self.eps)

    def build(self, groups, device):
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                 weight_decay=self.weight_decay,
                                 **kernel_options(torch.optim.AdamW, device))


@register("optimizer", "adam")
@dataclass
class AdamConfig(AdamWConfig):
    """torch.optim.Adam: weight decay is L2, added to the gradient (not decoupled)."""

    def build(self, groups, device):
        return torch.optim.Adam(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                weight_decay=self.weight_decay,
                                **kernel_options(torch.optim.Adam, device))


@register("optimizer", "sgd")
@dataclass
class SGDConfig(OptimizerConfig):
    """Plain SGD (momentum 0)."""

    def build(self, groups, device):
        return torch.optim.SGD(groups, lr=self.lr, weight_decay=self.weight_decay,
                               **kernel_options(torch.optim.SGD, device))


@register("optimizer", "momentum")
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
                               **kernel_options(torch.optim.SGD, device, momentum=True))


@register("optimizer", "nesterov")
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
                               **kernel_options(torch.optim.SGD, device, momentum=True))


@register("optimizer", "adagrad")
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


@register("optimizer", "rmsprop")
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


@register("optimizer", "lars")
@dataclass
class LARSConfig(OptimizerConfig):
    """trainrun.optimizers.layerwise.LARS: SGD with momentum and a per-tensor trust ratio."""

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


@register("optimizer", "lamb")
@dataclass
class LAMBConfig(AdamWConfig):
    """trainrun.optimizers.layerwise.LAMB: Adam moments with a per-tensor trust ratio."""

    def build(self, groups, device):
        return LAMB(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                    weight_decay=self.weight_decay)


EPS1_MIN = math.sqrt(torch.finfo(torch.float32).tiny)  # 1.08e-19: eps1² a normal float32


@register("optimizer", "adafactor")
@dataclass
class AdafactorConfig(OptimizerConfig):
    """torch.optim.Adafactor (Shazeer & Stern 2018): the second moment of a matrix kept as a
    row and a column vector, no first moment, decoupled weight decay."""

    beta2_decay: float = MISSING  # <= 0: beta2 at step t is 1 − t^beta2_decay
    eps: list[float | None] = MISSING  # [eps1 (null: the dtype's eps), eps2]
    d: float = MISSING  # >= 1: clipping threshold of the update's RMS

    shards: ClassVar[bool] = False  # torch's kernels have no rule for FSDP's sharded tensors

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not self.beta2_decay <= 0:
            raise ConfigError(f"{prefix}.beta2_decay",
                              f"got {self.beta2_decay}; allowed: beta2_decay <= 0")
        if len(self.eps) != 2 or self.eps[1] is None:
            raise ConfigError(f"{prefix}.eps", f"got {list(self.eps)}; allowed: [eps1, eps2], "
                                               f"eps1 null or >= {EPS1_MIN:.2g}, eps2 > 0")
        # torch floors the second-moment estimate at eps1² (the paper's ε1 = 1e-30 is on
        # that squared scale): below EPS1_MIN it is no normal float32 (0 from about 1e-23,
        # or where denormals are flushed), and a row of gradients that are all zero (an
        # unused token's embedding) then gives 0/0 weights at update 1
        eps1 = self.eps[0]
        if eps1 is not None and not (math.isfinite(eps1) and eps1 >= EPS1_MIN):
            raise ConfigError(f"{prefix}.eps[0]", f"got {eps1}; allowed: null (the dtype's "
                                                  f"eps) or eps1 >= {EPS1_MIN:.2g}, whose "
                                                  f"square float32 holds (torch squares it)")
        # eps2 floors the step's scale: at 0, weights that start at 0 (biases) never move
        require_positive(f"{prefix}.eps[1]", self.eps[1])
        if not self.d >= 1:
            raise ConfigError(f"{prefix}.d", f"got {self.d}; allowed: d >= 1")

    def build(self, groups, device):
        return torch.optim.Adafactor(groups, lr=self.lr, beta2_decay=self.beta2_decay,
                                     eps=tuple(self.eps), d=self.d,
                                     weight_decay=self.weight_decay,
                                     **kernel_options(torch.optim.Adafactor, device))
