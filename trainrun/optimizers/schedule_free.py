"""optimizer=schedulefree: schedule-free AdamW (Defazio et al. 2024) from the `schedulefree`
package, and the switch between a model's train and eval weights.

Schedule-free AdamW keeps two points: the parameters hold y, where gradients are taken,
and its state holds z; the weights to evaluate, save and export are their running average
x. `optimizer.eval()` puts x in the parameters, `optimizer.train()` puts y back. trainrun
does so around every validation and checkpoint (eval_weights), so `model.safetensors` holds
x. It replaces the decay schedule: only scheduler=constant goes with it, and the constant
schedule's warmup (scheduler.warmup_steps) is the package's own warmup, lr·k/W.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import schedulefree
import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive
from trainrun.optimizers.base import OptimizerConfig, require_betas
from trainrun.registry import register


class ScheduleFreeAdamW(schedulefree.AdamWScheduleFree):
    """schedulefree.AdamWScheduleFree, in train mode from the start, whose train() restores
    y exactly: eval() keeps a copy of y in each parameter's state (`train_weights`) and
    train() copies it back, where the package would recompute y from x and z (a lerp and
    its inverse, which differ in the last bits). So validations and checkpoints leave the
    training trajectory unchanged bit for bit, and a checkpoint, saved in eval mode with
    y in its state, resumes exactly: load_state_dict() ends in train mode."""

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self.train()

    @torch.no_grad()
    def eval(self):
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state.get(p, {}):
                        self.state[p]["train_weights"] = p.detach().clone()
        super().eval()

    @torch.no_grad()
    def train(self):
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state.get(p, {})
                if "train_weights" in state:
                    p.copy_(state.pop("train_weights"))
                elif "z" in state:  # saved by the package itself: its own formula
                    p.lerp_(end=state["z"].to(p.device), weight=1 - beta1)
            group["train_mode"] = True

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.train()


@contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within: the model holds the weights to evaluate, save and export (schedule-free:
    x); after: its train weights again. Nothing changes for optimizers without train()
    and eval() (the torch ones), which train and evaluate the same weights."""
    if not (callable(getattr(optimizer, "eval", None))
            and callable(getattr(optimizer, "train", None))):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


@register("optimizer", "schedulefree")
@dataclass
class ScheduleFreeConfig(OptimizerConfig):
    """schedulefree.AdamWScheduleFree's keys; its warmup is scheduler.warmup_steps."""

    betas: tuple[float, float] = MISSING  # beta1 interpolates between z and the average
    eps: float = MISSING
    r: float = MISSING  # >= 0: weights of the average grow as k^r
    weight_lr_power: float = MISSING  # >= 0: and as lr_max^weight_lr_power

    schedulers: ClassVar[tuple[str, ...]] = ("constant",)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_betas(f"{prefix}.betas", self.betas)
        if self.betas[0] == 0:  # eval() divides by beta1
            raise ConfigError(f"{prefix}.betas[0]", "got 0; allowed: 0 < betas[0] < 1")
        require_positive(f"{prefix}.eps", self.eps)
        require_positive(f"{prefix}.r", self.r, allow_zero=True)
        require_positive(f"{prefix}.weight_lr_power", self.weight_lr_power, allow_zero=True)

    def build(self, groups, device):
        return ScheduleFreeAdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                                 weight_decay=self.weight_decay, r=self.r,
                                 weight_lr_power=self.weight_lr_power)
