"""`trainrun-lr [-m] [out=DIR] [overrides]`: the learning-rate schedule a config produces
(SPEC §10), without building the model or loading data.

The config is composed and validated exactly as `trainrun` does it (same overrides, read by
`trainrun.cli.arguments`, same one-line errors, exit status 2). Prints, per curve, the first lr (update 1), the peak lr
and the update where it first occurs, the final lr (update N), and a plot in the terminal.
`out=DIR` also writes DIR/lr.csv (k, then one column of lr(k) per curve, k = 1..N) and
DIR/lr.png. `-m` expands comma-separated overrides (Hydra's sweep syntax, e.g.
`scheduler=cosine,noam,onecycle`) and shows every combination side by side.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainrun.cli import arguments, compose, fail, sweep
from trainrun.config import Config, option_name
from trainrun.errors import ConfigError
from trainrun.schedules import SCHEDULES, build_schedule

PROG = "trainrun-lr"
USAGE = f"""usage: {PROG} [-m] [out=DIR] [overrides ...]

Show the learning-rate schedule that `trainrun [overrides]` would use, without building the
model or loading data: first, peak (and where) and final lr, and a plot.

  -m, --multirun   expand comma-separated overrides (scheduler=cosine,noam) into curves
  out=DIR          also write DIR/lr.csv (k, lr per curve) and DIR/lr.png
  -h, --help       show this message

examples:
  {PROG}
  {PROG} scheduler=onecycle trainer.max_steps=2000 out=lr-preview
  {PROG} -m scheduler=cosine,noam,onecycle"""
MARKS = "*o+x#@%&=~"


@dataclass
class Curve:
    label: str
    lrs: list[float]  # lr(k) for k = 1..N
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> tuple[float, int]:
        """The highest lr and the first update k where it occurs."""
        top = max(self.lrs)
        return top, self.lrs.index(top) + 1


def parse_args(argv: Sequence[str]) -> tuple[bool, Path | None, list[str]]:
    """(-m given, out=DIR, the remaining overrides)."""
    multirun, out, overrides = False, None, []
    for arg in argv:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            raise ConfigError("argument", f"unknown option {arg!r}; allowed: -m, --multirun, -h")
        elif arg.split("=", 1)[0].lstrip("+") == "out":
            out = Path(arg.split("=", 1)[1]).expanduser()
        elif not arg.lstrip("+~").startswith(("hydra.", "hydra/")):  # nothing is launched
            overrides.append(arg)
    return multirun, out, overrides


def expand(overrides: list[str], multirun: bool) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each job: one without -m, Hydra's cartesian product with it.
    A job's label is its values of the swept keys ('' when nothing is swept)."""
    jobs, swept = sweep(overrides)
    if swept and not multirun:
        raise ConfigError(sorted(swept)[0], "is a sweep (several values); add -m to show "
                                            "one curve per value")
    return [(" ".join(a for a in job if a.split("=", 1)[0] in swept), job) for job in jobs]


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
    return Curve(label or f"scheduler={option}", [schedule(k) for k in range(1, n + 1)], notes)


def summary(curves: list[Curve]) -> str:
    width = max(12, *(len(c.label) for c in curves))
    lines = [f"{'schedule':<{width}}  {'first lr':>10}  {'peak lr':>10}  {'at update':>9}  "
             f"{'final lr':>10}  {'updates':>7}"]
    for c in curves:
        top, at = c.peak
        lines.append(f"{c.label:<{width}}  {c.lrs[0]:>10.3e}  {top:>10.3e}  {at:>9d}  "
                     f"{c.lrs[-1]:>10.3e}  {len(c.lrs):>7d}")
    lines += [f"note: {note}" for c in curves for note in c.notes]
    return "\n".join(lines)


def ascii_plot(curves: list[Curve], width: int = 64, height: int = 14) -> str:
    """lr against k as characters: one mark per curve, y from 0 to the highest lr."""
    n = max(len(c.lrs) for c in curves)
    top = max(max(c.lrs) for c in curves) or 1.0
    grid = [[" "] * width for _ in range(height)]
    marks = MARKS * len(curves)
    for mark, c in zip(marks, curves, strict=False):
        for col in range(width):
            k = 1 + round(col * (n - 1) / max(1, width - 1))
            if k <= len(c.lrs):
                row = round(c.lrs[k - 1] / top * (height - 1))
                grid[height - 1 - row][col] = mark
    labels = {0: f"{top:.2e}", height // 2: f"{top / 2:.2e}", height - 1: f"{0:.2e}"}
    lines = [f"{labels.get(r, ''):>9} |{''.join(row)}" for r, row in enumerate(grid)]
    lines.append(f"{'':>9} +{'-' * width}")
    lines.append(f"{'':>10}{'1':<{width // 2}}{(n + 1) // 2:<{width - width // 2 - len(str(n))}}{n}"
                 f"  (update k)")
    lines.append("  ".join(f"{mark} {c.label}" for mark, c in zip(marks, curves, strict=False)))
    return "\n".join(lines)


def write_csv(curves: list[Curve], path: Path, multirun: bool) -> None:
    """k, then lr(k) per curve (column `lr` for a single run; blank past a shorter run)."""
    n = max(len(c.lrs) for c in curves)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["k", *(c.label for c in curves)] if multirun else ["k", "lr"])
        for k in range(1, n + 1):
            out.writerow([k, *(repr(c.lrs[k - 1]) if k <= len(c.lrs) else "" for c in curves)])


def write_png(curves: list[Curve], path: Path, title: str = "learning-rate schedule") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in curves:
        ax.plot(range(1, len(c.lrs) + 1), c.lrs, label=c.label, linewidth=1.5)
    ax.set(xlabel="update k", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        multirun, out, overrides = parse_args(argv)
        jobs = expand(arguments(overrides), multirun)  # as `trainrun` reads them
        configs = compose([job for _, job in jobs])
        curves = [curve(label, cfg) for (label, _), cfg in zip(jobs, configs, strict=True)]
    except ConfigError as error:
        fail(error, PROG)
    try:
        print(f"{summary(curves)}\n\n{ascii_plot(curves)}", flush=True)
    except BrokenPipeError:  # `trainrun-lr | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(curves, out / "lr.csv", multirun)
        write_png(curves, out / "lr.png")
        print(f"wrote {out / 'lr.csv'} and {out / 'lr.png'}")


if __name__ == "__main__":
    main()
