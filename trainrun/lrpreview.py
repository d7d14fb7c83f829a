"""The learning-rate schedule a config produces (docs/schedules.md), without building the model or
loading data: the curves that `trainrun-lr` (trainrun.commands.lr) shows. Per curve, the
first lr (update 1), the peak lr and the update where it first occurs, the final lr
(update N), and a plot in the terminal; lr.csv (k, then one column of lr(k) per curve,
k = 1..N) and lr.png.

A run may have 10^11 updates: no list of every rate is ever made. The summary evaluates
lr(k) at update 1, at N and where the schedule says its peak can be
(SchedulerConfig.peak_candidates), so its figures are those of every update; the plot evaluates its columns;
lr.png is drawn through PNG_POINTS updates spread over the run, and lr.csv has a row per
update up to CSV_EVERY updates, beyond that CSV_POINTS rows spread over the run (with the
first, the peak and the last), and says so.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from trainrun.config import Config, option_name
from trainrun.schedules import SCHEDULES, build_schedule

MARKS = "*o+x#@%&=~"
CSV_EVERY = 1_000_000  # lr.csv has a row per update up to this many updates
CSV_POINTS = 10_000  # and this many rows beyond
PNG_POINTS = 4_000  # updates lr.png is drawn through


@dataclass
class Curve:
    """One schedule: lr(k) for k = 1..n, evaluated only where it is shown."""

    label: str
    lr: Callable[[int], float]
    n: int  # trainer.max_steps
    notes: list[str] = field(default_factory=list)
    peaks: Iterable[int] = ()  # the updates among which lr is highest (peak_candidates)

    @property
    def first(self) -> float:
        return self.lr(1)

    @property
    def final(self) -> float:
        return self.lr(self.n)

    @cached_property
    def peak(self) -> tuple[float, int]:
        """The highest lr and the first update k where it occurs. The rate never falls on
        its way to the peak, so the first k is found by bisection below the candidate that
        has it: a long rise rounds to the peak's float some updates before it gets there
        (onecycle over 10^11 updates)."""
        ks = sorted({k for k in (1, *self.peaks, self.n) if 1 <= k <= self.n})
        rates = [self.lr(k) for k in ks]
        top = max(rates)
        low, high = 1, ks[rates.index(top)]
        while low < high:
            mid = (low + high) // 2
            if self.lr(mid) >= top:
                high = mid
            else:
                low = mid + 1
        return top, low

    def points(self, count: int = PNG_POINTS) -> tuple[list[int], list[float]]:
        """(k, lr(k)) at `count` updates spread over the run (every one when n <= count),
        the peak's among them."""
        ks = sorted({*spread(self.n, count), self.peak[1]})
        return ks, [self.lr(k) for k in ks]


def spread(n: int, count: int) -> range | list[int]:
    """1..n when n <= count, else `count` updates evenly from 1 to n, both included."""
    if n <= count:
        return range(1, n + 1)
    return [1 + i * (n - 1) // (count - 1) for i in range(count)]


def curve(label: str, cfg: Config, evals: Sequence[tuple[int, float]] = ()) -> Curve:
    """lr(k) for k = 1..trainer.max_steps; `evals` (k, val/loss) feed val/loss schedules."""
    n = cfg.trainer.max_steps
    schedule = build_schedule(cfg.scheduler, cfg.optimizer.lr, n, cfg.model.d_model)
    schedule.evals = list(evals)
    option = option_name(cfg.scheduler, SCHEDULES)
    notes = schedule.notes()
    if cfg.scheduler.uses_val_loss and not evals:
        notes.append(f"scheduler={option}: its reductions depend on val/loss, which a preview "
                     f"does not have; shown without reductions")
    return Curve(label or f"scheduler={option}", schedule, n, notes,
                 schedule.cfg.peak_candidates(n))


def summary(curves: list[Curve]) -> str:
    width = max(12, *(len(c.label) for c in curves))
    lines = [f"{'schedule':<{width}}  {'first lr':>10}  {'peak lr':>10}  {'at update':>9}  "
             f"{'final lr':>10}  {'updates':>7}"]
    for c in curves:
        top, at = c.peak
        lines.append(f"{c.label:<{width}}  {c.first:>10.3e}  {top:>10.3e}  {at:>9d}  "
                     f"{c.final:>10.3e}  {c.n:>7d}")
    lines += [f"note: {note}" for c in curves for note in c.notes]
    return "\n".join(lines)


def ascii_plot(curves: list[Curve], width: int = 64, height: int = 14) -> str:
    """lr against k as characters: one mark per curve, y from 0 to the highest lr."""
    n = max(c.n for c in curves)
    top = max(c.peak[0] for c in curves) or 1.0
    grid = [[" "] * width for _ in range(height)]
    marks = MARKS * len(curves)
    for mark, c in zip(marks, curves, strict=False):
        for col in range(width):
            k = 1 + round(col * (n - 1) / max(1, width - 1))
            if k <= c.n:
                row = round(c.lr(k) / top * (height - 1))
                grid[height - 1 - row][col] = mark
    labels = {0: f"{top:.2e}", height // 2: f"{top / 2:.2e}", height - 1: f"{0:.2e}"}
    lines = [f"{labels.get(r, ''):>9} |{''.join(row)}" for r, row in enumerate(grid)]
    lines.append(f"{'':>9} +{'-' * width}")
    lines.append(f"{'':>10}{'1':<{width // 2}}{(n + 1) // 2:<{width - width // 2 - len(str(n))}}{n}"
                 f"  (update k)")
    lines.append("  ".join(f"{mark} {c.label}" for mark, c in zip(marks, curves, strict=False)))
    return "\n".join(lines)


def write_csv(curves: list[Curve], path: Path, multirun: bool) -> str | None:
    """k, then lr(k) per curve (column `lr` for a single run; blank past a shorter run): a
    row per update up to CSV_EVERY updates, else CSV_POINTS rows spread over the run and
    each curve's first, peak and last update, with a note that says so."""
    n = max(c.n for c in curves)
    if n <= CSV_EVERY:
        ks, note = range(1, n + 1), None
    else:
        ks = sorted({*spread(n, CSV_POINTS), *(k for c in curves for k in (1, c.peak[1], c.n))})
        note = (f"{path}: {len(ks):,} of the {n:,} updates, evenly spread, with the first, "
                f"the peak and the last (every update up to {CSV_EVERY:,})")
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["k", *(c.label for c in curves)] if multirun else ["k", "lr"])
        for k in ks:
            out.writerow([k, *(repr(c.lr(k)) if k <= c.n else "" for c in curves)])
    return note


def write_png(curves: list[Curve], path: Path, title: str = "learning-rate schedule") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in curves:
        ax.plot(*c.points(), label=c.label, linewidth=1.5)
    ax.set(xlabel="update k", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
