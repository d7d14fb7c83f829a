"""`trainrun-export RUN_DIR OUT`: a run's checkpoint as a Hugging Face folder of its model
family's format (trainrun.after.export writes it). OUT must not exist, or be an empty
folder."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from trainrun.after.export import start_command, write_folder
from trainrun.after.output import Messages, Parser, run_command
from trainrun.after.run import ARG, arguments, open_run
from trainrun.errors import ConfigError
from trainrun.models import formats

PROG = "trainrun-export"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Write a run's newest intact checkpoint (or --checkpoint) "
                                      f"as a Hugging Face folder of its model family's format "
                                      f"({formats()}) with its tokenizer.")
    arguments(p)
    p.add_argument("out", metavar="OUT", help="the folder to write (new, or empty)")
    return p


def check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError("OUT", f"{out} already exists; allowed: a new or empty folder")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ConfigError("OUT", f"{out}: cannot write in {parent}; allowed: a folder in a "
                                 f"writable directory")


def export(args: argparse.Namespace, _: list[str]) -> None:
    out = Path(args.out).expanduser()
    check_out(out)
    run = open_run(args.run_dir, ["trainer.device=cpu"], args.checkpoint, data=False,
                   config_dir=args.config_dir, weights=args.weights)
    if run.cfg.model.hf is None:
        raise ConfigError(ARG, f"{args.run_dir} holds a model of family {run.cfg.model.family}, "
                               f"which has no Hugging Face format; allowed: a run of a family "
                               f"that has one ({formats()})")
    messages = Messages()
    for warning in run.warnings:
        messages.warning(warning)
    files = write_folder(run, out)
    messages.info(f"{run.checkpoint} (update {run.step}): {run.model.num_params():,} parameters")
    print(f"wrote {out}: {', '.join(sorted(files))}")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
          f"AutoTokenizer.from_pretrained({str(out)!r}), or start a run from it with "
          f"{start_command(out, run.tokenizer, run.cfg.data.seq_len)}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    run_command(PROG, argv, parser(), export)


if __name__ == "__main__":
    main()
