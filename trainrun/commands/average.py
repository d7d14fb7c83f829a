"""`trainrun-average RUN_DIR --last N`: the average of a run's N newest intact checkpoints,
written as a checkpoint of the run (checkpoints/average-<first step>-<last step>/) that the
commands after training take with --checkpoint (trainrun.after.average computes and writes
it)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from trainrun.after.average import NAME_KEY, write_average
from trainrun.after.output import Messages, Parser, run_command
from trainrun.errors import ConfigError

PROG = "trainrun-average"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Average the weights of a run's N newest intact "
                                      "checkpoints into a new checkpoint of the run, "
                                      "checkpoints/average-<first step>-<last step>, for "
                                      "trainrun-sample, trainrun-eval and trainrun-export "
                                      "--checkpoint NAME. Resume and checkpoints/latest "
                                      "never take it.",
               epilog=f"example:\n  {PROG} outputs/2026-11-21/14-03-12 --last 5",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (outputs/<date>/<time>)")
    p.add_argument("--last", metavar="N", required=True,
                   help="how many of the newest intact checkpoints to average (>= 1)")
    p.add_argument(NAME_KEY, metavar="NAME",
                   help="the new checkpoint's folder in checkpoints/ (default: "
                        "average-<first step>-<last step>)")
    return p


def last(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ConfigError("--last", f"got {value!r}; allowed: an integer >= 1")
    return n


def average(args: argparse.Namespace, _: list[str]) -> None:
    n = last(args.last)
    paths, out, warnings = write_average(Path(args.run_dir).expanduser(), n,
                                         args.checkpoint_name)
    messages = Messages()
    for warning in warnings:
        messages.warning(warning)
    for path in paths:
        print(f"averaged {path}", flush=True)
    print(f"wrote {out}", flush=True)
    messages.info(f"use it with --checkpoint {out.name} (trainrun-sample, trainrun-eval, "
                  f"trainrun-export, trainrun-translate)")


def main(argv: Sequence[str] | None = None) -> None:
    run_command(PROG, argv, parser(), average)


if __name__ == "__main__":
    main()
