"""`trainrun-eval RUN_DIR [data overrides]`: loss, perplexity and bits per byte of a run's
checkpoint on a data set (trainrun.after.evaluate computes them); for a translation run,
loss, perplexity, BLEU and chrF on its validation or test split.

Data named on the command line (NAMING) is scored whole by default (--split all: every
document, none held out, each token a target once); the run's own data, its validation split
(--split validation, or train): all its sequences, the first --max-sequences or the first
--max-batches.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from trainrun import bleu, translate
from trainrun.after.evaluate import score, score_translation
from trainrun.after.output import Messages, Parser, run_command
from trainrun.after.run import arguments, open_run, thread_overrides, threads_argument
from trainrun.composition.overrides import key
from trainrun.errors import ConfigError

PROG = "trainrun-eval"
OVERRIDES = ("data", "precision", "trainer.device", "trainer.threads")  # data.*, precision.*
NAMING = ("data", "data.files", "data.path", "data.name", "data.train_split")  # other data
SPLITS = ("all", "validation", "train", "test")  # test: translation's data.test_* split


def parser() -> Parser:
    p = Parser(prog=PROG, description="Loss, perplexity and bits per byte of a run's checkpoint "
                                      "on its validation split, or on any data= source given "
                                      "as overrides (data=..., data.KEY=..., precision=..., "
                                      "trainer.device=..., trainer.threads=...).",
               usage=f"{PROG} RUN_DIR [overrides ...] [options]",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"examples:\n  {PROG} outputs/2026-11-21/14-03-12\n"
                      f"  {PROG} RUN_DIR --max-sequences 320 --json\n"
                      f"  {PROG} RUN_DIR data=text 'data.files=held-out/*.txt'")
    arguments(p)
    p.add_argument("--split", choices=SPLITS,
                   help="all: every document, none held out, each token a target once "
                        "(the default for data named on the command line: data=..., "
                        "data.files=..., data.path=...); validation (the default for the run's "
                        "own data) or train: that split's sequences, as the run reads them; "
                        "test: a translation run's test pairs (data.test_source_files, "
                        "data.test_target_files, or the source's test split)")
    p.add_argument("--max-sequences", type=int, metavar="N",
                   help="the first N sequences (default: all); the run's trainer.eval_sequences "
                        "gives its val/loss")
    p.add_argument("--max-batches", type=int, metavar="N",
                   help="the first N micro-batches of data.batch_size sequences (default: all)")
    threads_argument(p)
    group = p.add_argument_group("translation runs", "how the translations BLEU and chrF "
                                                     "score are made")
    translate.search_arguments(group, beam=4)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: loss, perplexity, bits_per_byte, sequences, "
                        "tokens, bytes, batches, split, documents (split all), checkpoint, "
                        "step; for a translation run loss, perplexity, bleu, chrf, their "
                        "signatures, sentences (those BLEU scores), loss_pairs (those the "
                        "loss reads), tokens, split, beam, length_penalty, checkpoint, step")
    return p


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        name = key(override)
        if not (name in OVERRIDES or name.startswith(("data.", "precision."))):
            raise ConfigError(name, f"not an override of {PROG}; allowed: data=OPTION, "
                                    f"data.KEY=VALUE, precision=OPTION, trainer.device=VALUE, "
                                    f"trainer.threads=N")


def evaluate(args: argparse.Namespace, overrides: list[str]) -> None:
    check_overrides(overrides)
    for name, value in (("--max-sequences", args.max_sequences),
                        ("--max-batches", args.max_batches)):
        if value is not None and value < 1:
            raise ConfigError(name, f"got {value}; allowed: an integer >= 1")
    if args.max_sequences is not None and args.max_batches is not None:
        raise ConfigError("--max-batches", "with --max-sequences; allowed: one of them")
    run = open_run(args.run_dir, [*overrides, *thread_overrides(args.threads)],
                   args.checkpoint, config_dir=args.config_dir, weights=args.weights)
    messages = Messages()
    for warning in run.warnings:
        messages.warning(warning)
    messages.info(run.threads)
    if run.cfg.data.task == "translation":
        evaluate_translation(args, run, overrides, messages)
        return
    split = args.split or ("all" if any(key(o) in NAMING for o in overrides) else "validation")
    if split == "test":
        raise ConfigError("--split", "test: the run's data has no test split (data=parallel's "
                                     "alone); allowed: all, validation, train")
    named = any(key(o) in NAMING for o in overrides)
    if split == "all" and getattr(run.cfg.data, "streaming", False) and not named:
        raise ConfigError("--split", "all of a run with data.streaming=true, whose corpus is "
                                     "read as a stream (scored whole it would be tokenized "
                                     "into the cache); allowed: validation (the stream's first "
                                     "slice), or all with the data named (data.files=...)")
    if split == "train" and getattr(run.cfg.data, "streaming", False):
        raise ConfigError("--split", "train of a run with data.streaming=true, a stream with "
                                     "no end to score; allowed: validation (the stream's "
                                     "first slice), or all with the data named (data.files=...)")
    result = score(run, split, args.max_sequences, args.max_batches, messages.info)
    show(result, args.json)


def evaluate_translation(args: argparse.Namespace, run, overrides: list[str],
                         messages: Messages) -> None:
    """Loss, perplexity, BLEU and chrF of a translation run: the test split when data.test_*
    is given on the command line, else the validation split (or --split)."""
    search = translate.search_of(args)
    bleu.require("trainrun-eval")
    if args.max_batches is not None:
        raise ConfigError("--max-batches", "with a translation run, whose batches are of "
                                           "tokens; allowed: --max-sequences N (pairs)")
    split = args.split or ("test" if any(key(o).startswith("data.test_") for o in overrides)
                           else "validation")
    if split == "all":
        raise ConfigError("--split", "all with a translation run; allowed: validation, test, "
                                     "train")
    result = score_translation(run, split, args.max_sequences, search, messages.info)
    messages.info(f"sacreBLEU {result['bleu_signature']}; {result['chrf_signature']}")
    if args.json:
        print(json.dumps(result), flush=True)
        return
    print(" | ".join(f"{name} {value}" for name, value in (
        ("loss", f"{result['loss']:.6f}"), ("perplexity", f"{result['perplexity']:.4f}"),
        ("BLEU", f"{result['bleu']:.2f}"), ("chrF", f"{result['chrf']:.2f}"),
        ("sentences", f"{result['sentences']:,}"), ("tokens", f"{result['tokens']:,}"))),
        flush=True)


def show(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result), flush=True)
        return
    figures = (("loss", f"{result['loss']:.6f}"), ("perplexity", f"{result['perplexity']:.4f}"),
               ("bits_per_byte", f"{result['bits_per_byte']:.6f}"),
               ("sequences", f"{result['sequences']:,}"), ("tokens", f"{result['tokens']:,}"),
               ("bytes", f"{result['bytes']:,}"))
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        data = "all the data" if result["split"] == "all" else f"{result['split']} split"
        table = Table(title=f"{data}, update {result['step']}")
        for name, _ in figures:
            table.add_column(name, justify="right")
        table.add_row(*(value for _, value in figures))
        Console().print(table)
    else:
        print(" | ".join(f"{name} {value}" for name, value in figures), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    run_command(PROG, argv, parser(), evaluate, overrides=True)


if __name__ == "__main__":
    main()
