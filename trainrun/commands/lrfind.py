"""`trainrun-lrfind [overrides] [lrfind.KEY=VALUE ...] [out=DIR]`: the learning-rate range
test (docs/schedules.md; trainrun.lrfind) on the model and data of `trainrun [overrides]`, built as
`trainrun` builds them. Writes lrfind.csv, lrfind.png and lrfind.log into out=DIR (default:
lrfind/<date>_<time>/ under the current directory); no checkpoint, no run directory.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trainrun.errors import ConfigError
from trainrun.lrfind import RangeTest, range_test, suggest, write_csv, write_png

PROG = "trainrun-lrfind"


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
    from trainrun import builders, determinism, runner
    from trainrun.composition import arguments, fail, task_overrides, validated_configs
    from trainrun.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return
    started = time.perf_counter()
    try:
        test, out, overrides = parse_args(argv)
        overrides = task_overrides(arguments(overrides))
        (cfg,) = validated_configs([overrides])
        device, precision = runner.device_and_precision(cfg)
    except ConfigError as error:
        fail(error, PROG)
    out = out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    console = Console(out / "lrfind.log")
    components = None
    try:
        try:
            components = builders.build_components(cfg, device, precision, console)
        except ConfigError as error:  # found while loading the data
            fail(error, PROG)
        console.info(f"lr range test: up to {test.num_updates} updates, lr {test.start_lr:.1e} "
                     f"to {test.end_lr:.1e} (exponential); smoothing {test.smoothing:g}, stop "
                     f"when the smoothed loss exceeds {test.diverge:g} × its best")
        result = range_test(components, test)
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
        if components is not None and hasattr(components.order, "close"):
            components.order.close()  # a stream's reading thread ends with the test
        determinism.restore()  # build_components() applied trainer.deterministic
        console.close()


if __name__ == "__main__":
    main()
