"""Optimizers by name, with torch's parameter names, and their parameter groups.

Weight decay is kept off the parameter kinds named in `no_decay` (by default biases, norm
gains and embeddings). torch's fused kernels are used where the device has them, else the
foreach (multi-tensor) ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive, require_range
from trainrun.model import parameter_kinds

KINDS = ("bias", "norm", "embedding", "weight")


@dataclass
class OptimizerConfig:
    lr: float = MISSING  # the base (peak) learning rate
    weight_decay: float = MISSING
    no_decay: list[str] = MISSING  # parameter kinds without weight decay: bias, norm, embedding

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.lr", self.lr)
        require_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        for kind in self.no_decay:
            if kind not in KINDS:
                raise ConfigError(
                    f"{prefix}.no_decay", f"got {kind!r}; allowed kinds: {', '.join(KINDS)}"
                )

    def build(self, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
        raise NotImplementedError


@dataclass
class AdamWConfig(OptimizerConfig):
    betas: tuple[float, float] = MISSING
    eps: float = MISSING

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        for i, beta in enumerate(self.betas):
            require_range(f"{prefix}.betas[{i}]", beta, 0.0, 0.999999)
        require_positive(f"{prefix}.eps", self.eps)

    def build(self, groups, device):
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                 weight_decay=self.weight_decay,
                                 **kernel_options(torch.optim.AdamW, device))


@dataclass
class SGDConfig(OptimizerConfig):
    """Plain SGD (momentum 0)."""

    def build(self, groups, device):
        return torch.optim.SGD(groups, lr=self.lr, weight_decay=self.weight_decay,
                               **kernel_options(torch.optim.SGD, device))


OPTIMIZERS = {"adamw": AdamWConfig, "sgd": SGDConfig}


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Two groups: with weight decay, and without (the kinds in cfg.no_decay)."""
    kinds = parameter_kinds(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if kinds[name] in cfg.no_decay else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def kernel_options(optimizer_cls: type, device: torch.device) -> dict:
    """fused=True where torch has a fused kernel for this optimizer on this device, else
    foreach=True."""
    fused_devices = {"cuda", "cpu", "mps", "xpu"}  # torch >= 2.4 for Adam, AdamW, SGD, Adagrad
    if optimizer_cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD,
                         torch.optim.Adagrad) and device.type in fused_devices:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module,
                    device: torch.device) -> torch.optim.Optimizer:
    return cfg.build(param_groups(model, cfg), device)
