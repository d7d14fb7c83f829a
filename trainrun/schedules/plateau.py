"""The plateau schedule: warmup, then torch's ReduceLROnPlateau driven by val/loss.

Its rate is a pure function of k and of the evaluations so far: `lr(k, ..., evals)` replays
ReduceLROnPlateau over the evaluations made after update W or later (those during warmup
are ignored: the rate is still rising on its own), each one lowering the rate from the next
update on. The evaluations live in `Schedule.state_dict()`, so a checkpoint restores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.registry import register
from trainrun.schedules.base import Evals, SchedulerConfig, require_floor, require_int

EPS = 1e-8  # ReduceLROnPlateau's default: reductions smaller than this are ignored


@register("scheduler", "plateau")
@dataclass
class PlateauConfig(SchedulerConfig):
    mode: str = MISSING  # min: val/loss should fall | max
    factor: float = MISSING  # new rate = rate × factor
    patience: int = MISSING  # evaluations without improvement tolerated
    threshold: float = MISSING  # how much better counts as an improvement
    threshold_mode: str = MISSING  # rel: best·(1 − threshold) | abs: best − threshold
    cooldown: int = MISSING  # evaluations to wait after a reduction
    min_lr: float = MISSING

    uses_val_loss: ClassVar[bool] = True

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        require_in(f"{prefix}.mode", self.mode, ("min", "max"))
        if not (math.isfinite(self.factor) and 0 < self.factor < 1):
            raise ConfigError(f"{prefix}.factor", f"got {self.factor}; allowed: 0 < factor < 1")
        require_int(f"{prefix}.patience", self.patience, 0)
        require_positive(f"{prefix}.threshold", self.threshold, allow_zero=True)
        require_in(f"{prefix}.threshold_mode", self.threshold_mode, ("rel", "abs"))
        if self.threshold_mode == "rel" and self.threshold >= 1:
            raise ConfigError(f"{prefix}.threshold", f"got {self.threshold} with threshold_mode="
                              f"rel; allowed: 0 <= threshold < 1")
        require_int(f"{prefix}.cooldown", self.cooldown, 0)
        require_floor(f"{prefix}.min_lr", self.min_lr, base_lr)

    def decay(self, e: int, d: int, base: float) -> float:
        return base  # no evaluations: no reductions

    def lr(self, k: int, base: float, max_steps: int, evals: Evals = ()) -> float:
        w = self.warmup(max_steps)
        if k <= w:
            return base * k / w
        return self.rate_after(base, [(j, loss) for j, loss in evals if w <= j < k])

    def _better(self, loss: float, best: float) -> bool:
        sign = 1 if self.mode == "min" else -1
        if self.threshold_mode == "rel":
            return sign * loss < sign * best * (1 - sign * self.threshold)
        return sign * loss < sign * best - self.threshold

    def rate_after(self, base: float, evals: Evals) -> float:
        """ReduceLROnPlateau(factor, patience, ...) stepped with each loss of `evals`."""
        rate, best = base, math.inf if self.mode == "min" else -math.inf
        bad = cooldown_left = 0
        for _, loss in evals:
            if self._better(loss, best):
                best, bad = loss, 0
            else:
                bad += 1
            if cooldown_left > 0:
                cooldown_left, bad = cooldown_left - 1, 0
            if bad > self.patience:
                new = max(rate * self.factor, self.min_lr)
                if rate - new > EPS:
                    rate = new
                cooldown_left, bad = self.cooldown, 0
        return rate
