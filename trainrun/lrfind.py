"""The learning-rate range test (docs/schedules.md; Smith 2017; fastai's lr_find) on the real model
and data, which `trainrun-lrfind` runs (trainrun.commands.lrfind).

The model, data, optimizer, clipping and precision are built from the config exactly as
`trainrun` builds them; the schedule is not used. Update i = 0..n−1 applies
lr_i = start_lr·(end_lr/start_lr)^(i/(n−1)). The training loss is smoothed with a
bias-corrected exponential moving average (beta = lrfind.smoothing); the test stops early
when the smoothed loss exceeds lrfind.diverge × its best value or the loss is not finite.
The suggested lr is where the smoothed loss falls fastest against log(lr), among the
points before its minimum.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainrun.errors import ConfigError, require_positive


@dataclass
class RangeTest:
    start_lr: float = 1e-7  # lr of the first update
    end_lr: float = 10.0  # lr of the last update
    num_updates: int = 100
    smoothing: float = 0.9  # beta of the moving average: lags ~beta/(1-beta) updates
    diverge: float = 4.0  # stop when the smoothed loss exceeds diverge × its best

    def validate(self) -> None:
        require_positive("lrfind.start_lr", self.start_lr)
        if not (math.isfinite(self.end_lr) and self.end_lr > self.start_lr):
            raise ConfigError("lrfind.end_lr", f"got {self.end_lr}; allowed: a number greater "
                                               f"than lrfind.start_lr={self.start_lr}")
        if self.num_updates < 2:
            raise ConfigError("lrfind.num_updates", f"got {self.num_updates}; allowed: an "
                                                    f"integer >= 2")
        if not 0 <= self.smoothing < 1:
            raise ConfigError("lrfind.smoothing", f"got {self.smoothing}; allowed: "
                                                  f"0 <= smoothing < 1")
        if not self.diverge > 1:
            raise ConfigError("lrfind.diverge", f"got {self.diverge}; allowed: a number > 1")

    def lr(self, i: int) -> float:
        """The lr of update i = 0..num_updates−1."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.num_updates - 1))


@dataclass
class Result:
    updates: list[int] = field(default_factory=list)  # 1-based; fp16's skipped ones missing
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = ""  # why the test ended before num_updates ('' if it did not)


def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average: avg_i / (1 − beta^(i+1))."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> int:
    """Index of the steepest descent of the smoothed loss against log(lr), among the points
    up to its minimum; the first tenth is skipped while the average settles."""
    best = int(np.argmin(smoothed))
    lo = min(len(lrs) // 10, max(best - 2, 0))
    if best - lo < 2:
        return best
    slope = np.gradient(np.asarray(smoothed[lo:best + 1]), np.log(np.asarray(lrs[lo:best + 1])))
    return lo + int(np.argmin(slope))


def range_test(components, test: RangeTest) -> Result:
    """Train with the exponentially increasing lr until num_updates or divergence."""
    from trainrun.loop import one_update
    from trainrun.schedules import set_lr

    result, skipped = Result(), 0
    components.replicas.module.train()
    for i in range(test.num_updates):
        lr = test.lr(i)
        set_lr(components.optimizer, lr, components.schedule.base_lr)
        update, _ = one_update(components)
        loss = float(update.loss)
        if not math.isfinite(loss):
            result.stopped = f"update {i + 1} (lr {lr:.2e}): the loss is not finite"
            break
        if not update.stepped:  # gradients not finite: under fp16 often only the loss
            skipped += 1        # scale, which the scaler lowers; the test goes on
            if skipped > components.cfg.max_skipped:
                result.stopped = (f"update {i + 1} (lr {lr:.2e}): the gradients were not "
                                  f"finite {skipped} updates in a row")
                break
            continue
        skipped = 0
        result.updates.append(i + 1)
        result.lrs.append(lr)
        result.losses.append(loss)
        result.smoothed = smooth(result.losses, test.smoothing)
        best = min(result.smoothed)
        if result.smoothed[-1] > test.diverge * best:
            result.stopped = (f"update {i + 1} (lr {lr:.2e}): smoothed loss "
                              f"{result.smoothed[-1]:.3f} > {test.diverge:g} × best {best:.3f}")
            break
    return result


def write_csv(result: Result, path: Path) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["update", "lr", "loss", "smoothed_loss"])
        rows = zip(result.updates, result.lrs, result.losses, result.smoothed, strict=True)
        for k, *row in rows:
            out.writerow([k, *map(repr, row)])


def write_png(result: Result, path: Path, suggested: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, linewidth=2, label="smoothed loss")
    ax.axvline(result.lrs[suggested], color="C3", linestyle="--",
               label=f"suggested lr {result.lrs[suggested]:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title="learning-rate range test")
    ax.set_ylim(min(result.losses) * 0.95, max(result.smoothed) * 1.05)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, dpi=120)
