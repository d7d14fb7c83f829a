"""Schedules with their own warmup, defined directly as lr(k): onecycle, noam, inverse_sqrt."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.registry import register
from trainrun.schedules.base import Evals, SchedulerConfig, require_int


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    """torch OneCycleLR's annealing from start (pct = 0) to end (pct = 1)."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


@register("scheduler", "onecycle")
@dataclass
class OneCycleConfig(SchedulerConfig):
    """OneCycleLR(max_lr=base, total_steps=N) at last_epoch = k − 1, momentum included."""

    pct_start: float = MISSING  # fraction of the run spent raising the rate
    anneal_strategy: str = MISSING  # cos | linear
    div_factor: float = MISSING  # first rate = base / div_factor
    final_div_factor: float = MISSING  # last rate = first rate / final_div_factor
    three_phase: bool = MISSING  # rise, fall back to the first rate, then anneal
    cycle_momentum: bool = MISSING  # move momentum / beta1 against the rate
    base_momentum: float = MISSING  # momentum at the peak rate
    max_momentum: float = MISSING  # momentum at the lowest rates

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        for key in ("warmup_steps", "warmup_ratio"):
            if getattr(self, key) is not None:
                raise ConfigError(f"{prefix}.{key}", f"got {getattr(self, key)}; onecycle has its "
                                  f"own warmup ({prefix}.pct_start); allowed: null")
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"{prefix}.pct_start",
                              f"got {self.pct_start}; allowed: 0 < pct_start < 1")
        if self.pct_start * max_steps <= 1:
            raise ConfigError(f"{prefix}.pct_start", f"the rising phase, pct_start × "
                              f"trainer.max_steps = {self.pct_start * max_steps:g} updates, must "
                              f"be longer than 1 update")
        if self.three_phase and self.pct_start >= 0.5:
            raise ConfigError(f"{prefix}.pct_start", f"got {self.pct_start} with three_phase=true; "
                              f"allowed: 0 < pct_start < 0.5 (two phases of pct_start each)")
        require_in(f"{prefix}.anneal_strategy", self.anneal_strategy, ("cos", "linear"))
        require_positive(f"{prefix}.div_factor", self.div_factor)
        require_positive(f"{prefix}.final_div_factor", self.final_div_factor)
        # the first and last rates, base/div_factor and base/(div_factor·final_div_factor),
        # may not exceed the peak, base (equal: a flat phase, allowed)
        if self.div_factor < 1:
            raise ConfigError(f"{prefix}.div_factor", f"{self.div_factor} puts the first rate, "
                              f"optimizer.lr/div_factor={base_lr / self.div_factor:.6g}, above "
                              f"optimizer.lr={base_lr}, the peak; allowed: div_factor >= 1")
        if self.div_factor * self.final_div_factor < 1:
            last = base_lr / (self.div_factor * self.final_div_factor)
            raise ConfigError(f"{prefix}.final_div_factor", f"{self.final_div_factor} puts the "
                              f"last rate, optimizer.lr/(div_factor·final_div_factor)={last:.6g}, "
                              f"above optimizer.lr={base_lr}, the peak; allowed: "
                              f"div_factor·final_div_factor >= 1")
        for key in ("base_momentum", "max_momentum"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(f"{prefix}.{key}", f"got {value}; allowed: 0 <= {key} < 1")
        if self.base_momentum > self.max_momentum:
            raise ConfigError(f"{prefix}.base_momentum", f"{self.base_momentum} exceeds "
                              f"{prefix}.max_momentum={self.max_momentum}")

    def _phase(self, step: int, n: int) -> tuple[int, float]:
        """(phase index, fraction of it done) at last_epoch = step, as torch finds them."""
        if self.three_phase:
            ends = [float(self.pct_start * n) - 1, float(2 * self.pct_start * n) - 2, n - 1]
        else:
            ends = [float(self.pct_start * n) - 1, n - 1]
        start = 0.0
        for i, end in enumerate(ends):
            if step <= end or i == len(ends) - 1:
                return i, (step - start) / (end - start)
            start = end
        raise AssertionError("unreachable")

    def peak_candidates(self, max_steps: int) -> set[int]:
        """Around the end of the rising phase, update pct_start·N (k = last_epoch + 1)."""
        end = math.floor(self.pct_start * max_steps)
        return {1, *range(end - 1, end + 3)}

    def lr(self, k: int, base: float, max_steps: int, evals: Evals = ()) -> float:
        initial = base / self.div_factor
        lowest = initial / self.final_div_factor
        points = [initial, base, initial, lowest] if self.three_phase else [initial, base, lowest]
        i, pct = self._phase(k - 1, max_steps)
        return _anneal(self.anneal_strategy, points[i], points[i + 1], pct)

    def momentum(self, k: int, max_steps: int) -> float | None:
        if not self.cycle_momentum:
            return None
        hi, lo = self.max_momentum, self.base_momentum
        points = [hi, lo, hi, hi] if self.three_phase else [hi, lo, hi]
        i, pct = self._phase(k - 1, max_steps)
        return _anneal(self.anneal_strategy, points[i], points[i + 1], pct)


@register("scheduler", "noam")
@dataclass
class NoamConfig(SchedulerConfig):
    """Vaswani et al. 2017: lr(k) = scale·d_model^−0.5·min(k^−0.5, k·W^−1.5), for every k;
    optimizer.lr is not used. W may exceed the run (the rate then rises throughout)."""

    scale: float = MISSING
    d_model: int | None = None  # null: the model's d_model

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        self.check_warmup_keys(prefix)
        require_positive(f"{prefix}.scale", self.scale)
        if self.d_model is not None:
            require_int(f"{prefix}.d_model", self.d_model, 1)
        if self.warmup(max_steps) < 1:
            raise ConfigError(f"{prefix}.{self.warmup_key()}", f"a warmup of "
                              f"{self.warmup(max_steps)} updates; noam needs at least 1 (set "
                              f"{prefix}.warmup_steps, 4000 in the paper)")

    def bind(self, d_model: int | None) -> NoamConfig:
        return self if self.d_model is not None else dataclasses.replace(self, d_model=d_model)

    def peak_candidates(self, max_steps: int) -> set[int]:
        """Around W, where min() changes sides, and N when W is longer than the run."""
        w = self.warmup(max_steps)
        return {1, w - 1, w, w + 1, max_steps}

    def lr(self, k: int, base: float, max_steps: int, evals: Evals = ()) -> float:
        if self.d_model is None:
            raise ValueError("noam needs d_model: build the schedule with the model's d_model")
        w = self.warmup(max_steps)
        return self.scale * self.d_model ** -0.5 * min(k ** -0.5, k * w ** -1.5)

    def notes(self, base: float, max_steps: int) -> list[str]:
        w = self.warmup(max_steps)
        lines = [f"scheduler=noam: optimizer.lr={base:g} is not used; lr(k) = scale·d_model^-0.5"
                 f"·min(k^-0.5, k·W^-1.5) with scale={self.scale:g}, d_model={self.d_model}, "
                 f"W={w}"]
        if w >= max_steps:
            lines.append(f"scheduler=noam: warmup of {w} updates is not shorter than "
                         f"trainer.max_steps={max_steps}: the rate rises for the whole run")
        return lines


@register("scheduler", "inverse_sqrt")
@dataclass
class InverseSqrtConfig(SchedulerConfig):
    """fairseq inverse_sqrt: base·k/W for k <= W, then base·sqrt(W/k) (noam named by its peak)."""

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        super().validate(prefix, max_steps, base_lr)
        if self.warmup(max_steps) < 1:
            raise ConfigError(f"{prefix}.{self.warmup_key()}", f"a warmup of "
                              f"{self.warmup(max_steps)} updates; inverse_sqrt needs at least 1")

    def lr(self, k: int, base: float, max_steps: int, evals: Evals = ()) -> float:
        w = self.warmup(max_steps)
        return base * k / w if k <= w else base * math.sqrt(w / k)
