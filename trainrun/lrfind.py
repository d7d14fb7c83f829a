"""`trainrun-lrfind [overrides] [lrfind.KEY=VALUE ...] [out=DIR]`: the learning-rate range
test (docs/schedules.md; Smith 2017; fastai's lr_find) on the real model and data.

The model, data, optimizer, clipping and precision are built from the config exactly as
`trainrun` builds them; the schedule is not used. Update i = 0..n−1 applies
lr_i = start_lr·(end_lr/start_lr)^(i/(n−1)). The training loss is smoothed with a
bias-corrected exponential moving average (beta = lrfind.smoothing); the test stops early
when the smoothed loss exceeds lrfind.diverge × its best value or the loss is not finite.
The suggested lr is where the smoothed loss falls fastest against log(lr), among the
points before its minimum. Writes lrfind.csv, lrfind.png and lrfind.log into out=DIR
(default: lrfind/<date>_<time>/ under the current directory); no checkpoint, no run
directory.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainrun.errors import ConfigError, require_positive

PROG = "trainrun-lrfind"


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


def parse_args(argv: Sequence[str]) -> tuple[RangeTest, Path | None, list[str]]:
    """(the lrfind.* keys, out=DIR, the overrides left for the config)."""
    keys = {f.name: f.type for f in dataclasses.fields(RangeTest)}
    values, out, overrides = {}, None, []
    for arg in argv:
        name, _, value = arg.lstrip("+").partition("=")
        if arg.startswith("-"):
            raise ConfigError("argument", f"unknown option {arg!r}; allowed: -h, --help")
        if name == "out":
            out = Path(value).expanduser()
        elif name.startswith("lrfind."):
            key = name[len("lrfind."):]
            if key not in keys:
                raise ConfigError(name, f"unknown key; allowed keys here: {', '.join(keys)}")
            try:
                values[key] = int(value) if keys[key] == "int" else float(value)
            except ValueError:
                raise ConfigError(name, f"{value!r} is not a number") from None
        else:
            overrides.append(arg)
    test = RangeTest(**values)
    test.validate()
    return test, out, overrides


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


def range_test(trainer, test: RangeTest) -> Result:
    """Train with the exponentially increasing lr until num_updates or divergence."""
    from trainrun.loop import one_update
    from trainrun.schedules import set_lr

    result, skipped = Result(), 0
    trainer.replicas.module.train()
    for i in range(test.num_updates):
        lr = test.lr(i)
        set_lr(trainer.optimizer, lr, trainer.schedule.base_lr)
        update, _ = one_update(trainer)
        loss = float(update.loss)
        if not math.isfinite(loss):
            result.stopped = f"update {i + 1} (lr {lr:.2e}): the loss is not finite"
            break
        if not update.stepped:  # gradients not finite: under fp16 often only the loss
            skipped += 1        # scale, which the scaler lowers; the test goes on
            if skipped > trainer.cfg.max_skipped:
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


def usage() -> str:
    keys = "\n".join(f"  lrfind.{f.name}={f.default:g}" for f in dataclasses.fields(RangeTest))
    return (f"usage: {PROG} [overrides ...] [lrfind.KEY=VALUE ...] [out=DIR]\n\n"
            f"Learning-rate range test on the model and data of `trainrun [overrides]`: the lr\n"
            f"grows exponentially each update; prints the suggested lr and writes\n"
            f"lrfind.csv and lrfind.png into out=DIR (default: lrfind/<date>_<time>/).\n\n"
            f"keys and defaults:\n{keys}\n\nexample:\n  {PROG} optimizer=sgd "
            f"lrfind.start_lr=1e-4 lrfind.end_lr=1 lrfind.num_updates=60 out=find-sgd")


def default_out() -> Path:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out, n = Path("lrfind") / stamp, 1
    while out.exists():
        out, n = Path("lrfind") / f"{stamp}-{n}", n + 1
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from trainrun import determinism, runner
    from trainrun.cli import arguments, compose, fail, task_overrides
    from trainrun.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return
    started = time.perf_counter()
    try:
        test, out, overrides = parse_args(argv)
        overrides = task_overrides(arguments(overrides))
        (cfg,) = compose([overrides])
        device, precision = runner.prepare(cfg)
    except ConfigError as error:
        fail(error, PROG)
    out = out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    console = Console(out / "lrfind.log")
    try:
        try:
            trainer = runner.build(cfg, device, precision, console)
        except ConfigError as error:  # found while loading the data
            fail(error, PROG)
        console.info(f"lr range test: up to {test.num_updates} updates, lr {test.start_lr:.1e} "
                     f"to {test.end_lr:.1e} (exponential); smoothing {test.smoothing:g}, stop "
                     f"when the smoothed loss exceeds {test.diverge:g} × its best")
        result = range_test(trainer, test)
        if len(result.lrs) < 2:
            console.warning(f"no usable curve: {result.stopped}; lower lrfind.start_lr")
            sys.exit(1)
        i, best = suggest(result.lrs, result.smoothed), int(np.argmin(result.smoothed))
        write_csv(result, out / "lrfind.csv")
        write_png(result, out / "lrfind.png", i)
        console.info(f"stopped at {result.stopped}" if result.stopped
                     else f"completed all {test.num_updates} updates without diverging")
        console.info(f"minimum smoothed loss {result.smoothed[best]:.4f} at lr "
                     f"{result.lrs[best]:.2e} (update {best + 1})")
        console.info(f"suggested lr: {result.lrs[i]:.2e} (steepest descent of the smoothed "
                     f"loss, update {i + 1}); use it as optimizer.lr={result.lrs[i]:.2e}")
        console.info(f"wrote {out / 'lrfind.csv'} and {out / 'lrfind.png'} in "
                     f"{time.perf_counter() - started:.1f}s")
    finally:
        determinism.restore()  # runner.build() applied trainer.deterministic
        console.close()


if __name__ == "__main__":
    main()
