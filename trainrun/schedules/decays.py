"""Schedules that are a warmup followed by a closed-form decay of e = k − W − 1
(docs/design.md, Schedules).

Each `decay(e, D, base)` equals its reference at e = 0..D−1: torch's scheduler after e calls
of `scheduler.step()`, or TF's / transformers' formula at global step e.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.registry import register
from trainrun.schedules.base import (
    Evals,
    SchedulerConfig,
    require_decay_factor,
    require_floor,
    require_int,
)


@register("scheduler", "constant")
@dataclass
class ConstantConfig(SchedulerConfig):
    def decay(self, e: int, d: int, base: float) -> float:
        return base


@register("scheduler", "step")
@dataclass
class StepConfig(SchedulerConfig):
    """StepLR: base·gamma^floor(e / step_size)."""

    step_size: int = MISSING  # updates between two multiplications by gamma
    gamma: float = MISSING

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        require_int(f"{prefix}.step_size", self.step_size, 1)
        require_decay_factor(f"{prefix}.gamma", self.gamma)

    def decay(self, e: int, d: int, base: float) -> float:
        return base * self.gamma ** (e // self.step_size)


@register("scheduler", "multistep")
@dataclass
class MultiStepConfig(SchedulerConfig):
    """MultiStepLR: base·gamma^(number of milestones <= e). Milestones count e, the updates
    after warmup (torch's convention): milestone m lowers the rate from update W + m + 1 on."""

    milestones: list[int] = MISSING
    gamma: float = MISSING

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        d = max_steps - self.warmup(max_steps)
        ms = list(self.milestones)
        allowed = (f"allowed: a strictly increasing list of integers in 1..{d - 1} (milestones "
                   f"count the D = {d} updates after warmup)")
        if not ms:
            raise ConfigError(f"{prefix}.milestones", f"is empty; {allowed}")
        if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
            raise ConfigError(f"{prefix}.milestones",
                              f"{ms} is not strictly increasing; {allowed}")
        if ms[0] < 1 or ms[-1] > d - 1:
            raise ConfigError(f"{prefix}.milestones",
                              f"{ms} has values outside 1..{d - 1}; {allowed}")
        require_decay_factor(f"{prefix}.gamma", self.gamma)

    def decay(self, e: int, d: int, base: float) -> float:
        return base * self.gamma ** bisect.bisect_right(self.milestones, e)


@register("scheduler", "exponential")
@dataclass
class ExponentialConfig(SchedulerConfig):
    """Two forms, chosen by gamma: a number selects ExponentialLR, base·gamma^e; null selects
    TF's exponential_decay, base·decay_rate^(e / decay_steps) (floor of the exponent when
    staircase), with decay_steps null meaning D."""

    gamma: float | None = MISSING
    decay_rate: float | None = MISSING
    decay_steps: int | None = MISSING
    staircase: bool = MISSING

    one_of = (*SchedulerConfig.one_of, (("gamma",), ("decay_rate", "decay_steps")))

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        if self.gamma is not None:
            require_decay_factor(f"{prefix}.gamma", self.gamma)
            for key in ("decay_rate", "decay_steps"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{prefix}.{key}", f"given together with {prefix}.gamma; "
                                      f"set {prefix}.gamma=null to use the decay_rate form")
            if self.staircase:
                raise ConfigError(f"{prefix}.staircase", f"applies to the decay_rate form only; "
                                  f"set {prefix}.gamma=null to use it")
            return
        if self.decay_rate is None:
            raise ConfigError(f"{prefix}.decay_rate", f"null, and so is {prefix}.gamma; "
                              f"set one of them (gamma: base·gamma^e; decay_rate: TF form)")
        require_decay_factor(f"{prefix}.decay_rate", self.decay_rate)
        if self.decay_steps is not None:
            require_int(f"{prefix}.decay_steps", self.decay_steps, 1)

    def decay(self, e: int, d: int, base: float) -> float:
        if self.gamma is not None:
            return base * self.gamma ** e
        p = e / (self.decay_steps or d)
        return base * self.decay_rate ** (math.floor(p) if self.staircase else p)


@register("scheduler", "cosine")
@dataclass
class CosineConfig(SchedulerConfig):
    """CosineAnnealingLR(T_max=D, eta_min=min_lr)."""

    min_lr: float = MISSING

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        require_floor(f"{prefix}.min_lr", self.min_lr, base_lr)

    def decay(self, e: int, d: int, base: float) -> float:
        return self.min_lr + (base - self.min_lr) * (1 + math.cos(math.pi * e / d)) / 2


@register("scheduler", "cosine_restarts")
@dataclass
class CosineRestartsConfig(SchedulerConfig):
    """SGDR, CosineAnnealingWarmRestarts(T_0, T_mult, eta_min=min_lr): cosine within cycles of
    T_0, T_0·T_mult, ... updates; cycle i (from 0) starts at base·cycle_decay^i."""

    T_0: int = MISSING  # updates in the first cycle
    T_mult: int = MISSING  # each cycle is T_mult times longer than the one before
    min_lr: float = MISSING
    cycle_decay: float = MISSING  # the peak is multiplied by this at each restart

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        require_int(f"{prefix}.T_0", self.T_0, 1)
        require_int(f"{prefix}.T_mult", self.T_mult, 1)
        require_floor(f"{prefix}.min_lr", self.min_lr, base_lr)
        require_decay_factor(f"{prefix}.cycle_decay", self.cycle_decay)
        # cycle_decay lowers each restart's peak: the last one the run reaches must stay
        # above min_lr, or that cycle's cosine climbs instead of decaying
        last, _, _ = self.position(max_steps - self.warmup(max_steps) - 1)
        peak = base_lr * self.cycle_decay ** last
        if self.min_lr > peak:
            raise ConfigError(f"{prefix}.min_lr", f"{self.min_lr} is above {peak:.6g}, the peak of "
                              f"the run's last cycle (optimizer.lr={base_lr} × cycle_decay^"
                              f"{last}); allowed: 0 <= min_lr <= {peak:.6g}, or a cycle_decay "
                              f"closer to 1")

    def decay(self, e: int, d: int, base: float) -> float:
        cycle, t, period = self.position(e)
        peak = base * self.cycle_decay ** cycle
        return self.min_lr + (peak - self.min_lr) * (1 + math.cos(math.pi * t / period)) / 2

    def position(self, e: int) -> tuple[int, int, int]:
        """(cycle i, updates into it, its length) at e, in O(1): cycle i starts at
        T_0·(T_mult^i − 1)/(T_mult − 1) (at T_0·i when T_mult = 1)."""
        if self.T_mult == 1:
            cycle, t = divmod(e, self.T_0)
            return cycle, t, self.T_0

        def start(i: int) -> int:
            return self.T_0 * (self.T_mult**i - 1) // (self.T_mult - 1)

        cycle = int(math.log(e * (self.T_mult - 1) / self.T_0 + 1, self.T_mult))
        while start(cycle + 1) <= e:  # the float log may be one off at a boundary
            cycle += 1
        while start(cycle) > e:
            cycle -= 1
        return cycle, e - start(cycle), self.T_0 * self.T_mult**cycle


@register("scheduler", "linear")
@dataclass
class LinearConfig(SchedulerConfig):
    """Linear decay from base towards min_lr over D updates (transformers' linear schedule
    when min_lr = 0; LinearLR(1, min_lr/base, D))."""

    min_lr: float = MISSING

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        require_floor(f"{prefix}.min_lr", self.min_lr, base_lr)

    def decay(self, e: int, d: int, base: float) -> float:
        return self.min_lr + (base - self.min_lr) * (1 - e / d)


@register("scheduler", "polynomial")
@dataclass
class PolynomialConfig(SchedulerConfig):
    """TF polynomial_decay at global step e: end_lr + (base − end_lr)·(1 − min(e, S)/S)^power,
    S = decay_steps (null: D); with cycle, S grows to the next multiple of itself above e."""

    power: float = MISSING
    end_lr: float = MISSING
    decay_steps: int | None = MISSING
    cycle: bool = MISSING

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        require_positive(f"{prefix}.power", self.power)
        require_floor(f"{prefix}.end_lr", self.end_lr, base_lr)
        if self.decay_steps is not None:
            require_int(f"{prefix}.decay_steps", self.decay_steps, 1)

    def decay(self, e: int, d: int, base: float) -> float:
        s = self.decay_steps or d
        if self.cycle:
            s *= max(1, math.ceil(e / s))
        p = min(e, s) / s
        return self.end_lr + (base - self.end_lr) * (1 - p) ** self.power


WSD_SHAPES = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
    "1-sqrt": lambda p: 1 - math.sqrt(p),
}


@register("scheduler", "wsd")
@dataclass
class WSDConfig(SchedulerConfig):
    """Warmup-stable-decay (transformers' get_wsd_schedule after its warmup): hold base, then
    decay to min_lr over the last S updates, S = decay_steps or round(decay_ratio·N)."""

    decay_steps: int | None = MISSING
    decay_ratio: float | None = MISSING
    decay_type: str = MISSING  # linear | cosine | 1-sqrt
    min_lr: float = MISSING

    one_of = (*SchedulerConfig.one_of, (("decay_steps",), ("decay_ratio",)))

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        if (self.decay_steps is None) == (self.decay_ratio is None):
            raise ConfigError(f"{prefix}.decay_steps", f"set exactly one of {prefix}.decay_steps "
                              f"and {prefix}.decay_ratio, and the other to null")
        if self.decay_steps is not None:
            require_int(f"{prefix}.decay_steps", self.decay_steps, 1)
        elif not 0 < self.decay_ratio <= 1:
            raise ConfigError(f"{prefix}.decay_ratio",
                              f"got {self.decay_ratio}; allowed: 0 < decay_ratio <= 1")
        s, d = self.decay_length(max_steps), max_steps - self.warmup(max_steps)
        if not 1 <= s <= d:
            key = "decay_steps" if self.decay_steps is not None else "decay_ratio"
            raise ConfigError(f"{prefix}.{key}", f"a decay of {s} updates; allowed: 1..{d}, "
                              f"the updates after warmup")
        require_in(f"{prefix}.decay_type", self.decay_type, tuple(WSD_SHAPES))
        require_floor(f"{prefix}.min_lr", self.min_lr, base_lr)

    def decay_length(self, max_steps: int) -> int:
        if self.decay_steps is not None:
            return self.decay_steps
        return round(self.decay_ratio * max_steps)

    def lr(self, k: int, base: float, max_steps: int, evals: Evals = ()) -> float:
        w = self.warmup(max_steps)
        if k <= w:
            return base * k / w
        e, stable = k - w - 1, max_steps - w - self.decay_length(max_steps)
        if e < stable:
            return base
        p = (e - stable) / self.decay_length(max_steps)
        return self.min_lr + (base - self.min_lr) * WSD_SHAPES[self.decay_type](p)
