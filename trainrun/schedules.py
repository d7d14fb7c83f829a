"""Learning-rate schedules (SPEC §4), counted in optimizer updates.

`lr(k)` is the rate that update k = 1..N applies, and what `train/lr` logs at step k.
Warmup, where a schedule has it: lr(k) = base·k/W for k <= W; then the schedule's decay
runs with e = k − W − 1 = 0, 1, ..., D − 1 over D = N − W updates. Each option's schema
implements `decay(e, D, base)`; schedules with their own warmup override `lr` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive


@dataclass
class SchedulerConfig:
    warmup_steps: int | None = None  # W; or
    warmup_ratio: float | None = None  # W = round(warmup_ratio × N)

    def validate(self, prefix: str, max_steps: int) -> None:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError(
                f"{prefix}.warmup_steps",
                f"given together with {prefix}.warmup_ratio; set one of them and the other to null",
            )
        if self.warmup_steps is not None:
            require_positive(f"{prefix}.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(
                f"{prefix}.warmup_ratio", f"got {self.warmup_ratio}; allowed: 0 <= warmup_ratio < 1"
            )
        w = self.warmup(max_steps)
        if w >= max_steps:
            key = "warmup_steps" if self.warmup_steps is not None else "warmup_ratio"
            raise ConfigError(
                f"{prefix}.{key}",
                f"warmup of {w} updates is not shorter than trainer.max_steps={max_steps}; "
                f"allowed: fewer warmup updates than the run has",
            )

    def warmup(self, max_steps: int) -> int:
        """W, the number of warmup updates."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * max_steps)
        return 0

    def lr(self, k: int, base: float, max_steps: int) -> float:
        """The rate update k (1-based) applies."""
        w = self.warmup(max_steps)
        if k <= w:
            return base * k / w
        return self.decay(k - w - 1, max_steps - w, base)

    def decay(self, e: int, d: int, base: float) -> float:
        """The rate after warmup at e = 0..d-1."""
        raise NotImplementedError


@dataclass
class ConstantConfig(SchedulerConfig):
    def decay(self, e: int, d: int, base: float) -> float:
        return base


@dataclass
class CosineConfig(SchedulerConfig):
    """CosineAnnealingLR(T_max=D, eta_min=min_lr) after warmup."""

    min_lr: float = MISSING

    def validate(self, prefix: str, max_steps: int) -> None:
        super().validate(prefix, max_steps)
        require_positive(f"{prefix}.min_lr", self.min_lr, allow_zero=True)

    def decay(self, e: int, d: int, base: float) -> float:
        return self.min_lr + (base - self.min_lr) * (1 + math.cos(math.pi * e / d)) / 2


SCHEDULES = {"constant": ConstantConfig, "cosine": CosineConfig}


class Schedule:
    """A schedule bound to its run: `schedule(k)` is lr(k). Stateless schedules have an
    empty state; the plateau schedule keeps its evaluation history here."""

    def __init__(self, cfg: SchedulerConfig, base_lr: float, max_steps: int):
        self.cfg, self.base_lr, self.max_steps = cfg, base_lr, max_steps

    def __call__(self, k: int) -> float:
        return self.cfg.lr(k, self.base_lr, self.max_steps)

    def apply(self, optimizer, k: int) -> float:
        """Set every parameter group's lr to lr(k) before update k; return lr(k)."""
        lr = self(k)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe(self, val_loss: float) -> None:
        """A validation result; only schedules driven by val/loss use it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_schedule(cfg: SchedulerConfig, base_lr: float, max_steps: int) -> Schedule:
    return Schedule(cfg, base_lr, max_steps)
