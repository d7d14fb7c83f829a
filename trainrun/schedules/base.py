"""The contract every learning-rate schedule follows, and the checks they share
(docs/design.md, Schedules).

Counting: k = 1..N is the optimizer update (N = trainer.max_steps); lr(k) is the rate that
update k applies. Warmup, where an option has it: lr(k) = base·k/W for k <= W (W =
warmup_steps, or round(warmup_ratio·N)); then the option's `decay(e, D, base)` runs with
e = k − W − 1 = 0..D−1 over D = N − W updates, equal to torch's scheduler after e calls of
`scheduler.step()`. Options with their own warmup override `lr` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from trainrun.errors import ConfigError, require_positive

Evals = Sequence[tuple[int, float]]  # (k, val/loss measured after update k), oldest first


@dataclass
class SchedulerConfig:
    warmup_steps: int | None = None  # W; or
    warmup_ratio: float | None = None  # W = round(warmup_ratio × N)

    uses_val_loss: ClassVar[bool] = False  # True: lr also depends on the evaluations (plateau)
    # "One of these keys" pairs (side, other side). Naming keys of one side only, on the
    # command line or on resume, sets the other side's keys to null (trainrun.composition.overrides);
    # naming both sides with values is an error (validate).
    one_of: ClassVar[tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = (
        (("warmup_steps",), ("warmup_ratio",)),
    )

    def validate(self, prefix: str, max_steps: int, base_lr: float) -> None:
        """Check this option's keys for a run of max_steps updates whose peak rate is
        base_lr (optimizer.lr)."""
        self.check_warmup_keys(prefix)
        self.check_warmup_fits(prefix, max_steps)

    def check_warmup_keys(self, prefix: str) -> None:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError(
                f"{prefix}.warmup_steps",
                f"given together with {prefix}.warmup_ratio; set one of them and the other to null",
            )
        if self.warmup_steps is not None:
            require_int(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(
                f"{prefix}.warmup_ratio", f"got {self.warmup_ratio}; allowed: 0 <= warmup_ratio < 1"
            )

    def check_warmup_fits(self, prefix: str, max_steps: int) -> None:
        w = self.warmup(max_steps)
        if w >= max_steps:
            raise ConfigError(
                f"{prefix}.{self.warmup_key()}",
                f"warmup of {w} updates is not shorter than trainer.max_steps={max_steps}; "
                f"allowed: fewer warmup updates than the run has",
            )

    def warmup_key(self) -> str:
        return "warmup_ratio" if self.warmup_ratio is not None else "warmup_steps"

    def warmup(self, max_steps: int) -> int:
        """W, the number of warmup updates."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * max_steps)
        return 0

    def lr(self, k: int, base: float, max_steps: int, evals: Evals = ()) -> float:
        """The rate update k (1-based) applies; `evals` matter only when uses_val_loss."""
        w = self.warmup(max_steps)
        if k <= w:
            return base * k / w
        return self.decay(k - w - 1, max_steps - w, base)

    def decay(self, e: int, d: int, base: float) -> float:
        """The rate after warmup at e = 0..d-1."""
        raise NotImplementedError

    def peak_candidates(self, max_steps: int) -> set[int]:
        """Updates among which lr(k) is highest, the first update where it is included: the
        ends of the rising phases, since elsewhere the rate never climbs above them (every
        decay starts from its highest rate; later restarts or cycles start lower or as high).
        trainrun-lr finds the peak of a run of 10^11 updates there. Values outside 1..N are
        ignored."""
        w = self.warmup(max_steps)
        return {1, w, w + 1}

    def momentum(self, k: int, max_steps: int) -> float | None:
        """The momentum (SGD) or beta1 (Adam) update k uses, for schedules that cycle it."""
        return None

    def bind(self, d_model: int | None) -> SchedulerConfig:
        """This schedule with the run's values filled in where its keys default to them."""
        return self

    def notes(self, base: float, max_steps: int) -> list[str]:
        """Lines the run's log must show about this schedule (e.g. keys that are unused)."""
        return []


def require_int(key: str, value: int, low: int) -> None:
    """An integer >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, f"got {value}; allowed: an integer >= {low}")


def require_decay_factor(key: str, value: float) -> None:
    """A multiplier that lowers the rate: 0 < value <= 1."""
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ConfigError(key, f"got {value}; allowed: 0 < {key.rsplit('.', 1)[-1]} <= 1")


def require_floor(key: str, value: float, base_lr: float) -> None:
    """A rate the schedule decays towards (min_lr, end_lr): 0 <= value <= optimizer.lr.

    Above the peak, the "decay" would climb (a cosine from 0.003 to 1 rises 333-fold);
    equal to it, the schedule is a constant, which is allowed."""
    require_positive(key, value, allow_zero=True)
    if value > base_lr:
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(key, f"{value} is above optimizer.lr={base_lr}, the peak; "
                               f"allowed: 0 <= {name} <= optimizer.lr")
