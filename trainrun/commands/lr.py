"""`trainrun-lr [-m] [out=DIR] [overrides]`: the learning-rate schedule a config produces
(docs/schedules.md), without building the model or loading data (trainrun.lrpreview draws it).

The config is composed and validated exactly as `trainrun` does it (same overrides, read by
`trainrun.composition.arguments`, same one-line errors, exit status 2). `out=DIR` also
writes DIR/lr.csv and DIR/lr.png. `-m` expands comma-separated overrides (Hydra's sweep
syntax, e.g. `scheduler=cosine,noam,onecycle`) and shows every combination side by side.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trainrun.composition import arguments, fail, sweep, validated_configs
from trainrun.errors import ConfigError
from trainrun.lrpreview import ascii_plot, curve, summary, write_csv, write_png

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


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        multirun, out, overrides = parse_args(argv)
        jobs = expand(arguments(overrides), multirun)  # as `trainrun` reads them
        configs = validated_configs([job for _, job in jobs])
        curves = [curve(label, cfg) for (label, _), cfg in zip(jobs, configs, strict=True)]
    except ConfigError as error:
        fail(error, PROG)
    try:
        print(f"{summary(curves)}\n\n{ascii_plot(curves)}", flush=True)
    except BrokenPipeError:  # `trainrun-lr | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        note = write_csv(curves, out / "lr.csv", multirun)
        write_png(curves, out / "lr.png")
        print(f"wrote {out / 'lr.csv'} and {out / 'lr.png'}")
        if note is not None:
            print(f"note: {note}")


if __name__ == "__main__":
    main()
