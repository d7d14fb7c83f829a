"""`trainrun-eval RUN_DIR [data overrides]`: loss, perplexity and bits per byte of a run's
checkpoint on a data set.

The data are the run's own (its saved data overrides) unless overridden (`data=text
data.files=...`, any data= source), built by the data code the run uses. Data named on the
command line (NAMING) is scored whole by default (--split all: every document, none held
out, each token a target once: data.Windows); the run's own data, its validation split
(--split validation, or train). The sequences are read in order, in micro-batches of
data.batch_size, all of them, the first --max-sequences or the first --max-batches, exactly
as validation reads them during training (trainrun.validation): the run's own validation
split with --max-sequences = trainer.eval_sequences gives its val/loss.

    loss           = total / targets  (nats per target token; padding is not a target)
    perplexity     = exp(loss)
    bits_per_byte  = total / ln 2 / bytes

where total is the sum of -ln p(target) over the targets and bytes the number of UTF-8
bytes of the target tokens' text (an end-of-document target counts in the loss, with no
bytes), so that bits per byte compares models with different tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import numpy as np

from trainrun import data
from trainrun.after.output import Messages, Parser, run_command
from trainrun.after.run import arguments, open_run, thread_overrides, threads_argument
from trainrun.cli.overrides import key
from trainrun.errors import ConfigError
from trainrun.validation import batches as micro_batches
from trainrun.validation import sequence_losses

PROG = "trainrun-eval"
OVERRIDES = ("data", "precision", "trainer.device", "trainer.threads")  # data.*, precision.*
NAMING = ("data", "data.files", "data.path", "data.name", "data.train_split")  # other data
SPLITS = ("all", "validation", "train")


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
                        "own data) or train: that split's sequences, as the run reads them")
    p.add_argument("--max-sequences", type=int, metavar="N",
                   help="the first N sequences (default: all); the run's trainer.eval_sequences "
                        "gives its val/loss")
    p.add_argument("--max-batches", type=int, metavar="N",
                   help="the first N micro-batches of data.batch_size sequences (default: all)")
    threads_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: loss, perplexity, bits_per_byte, sequences, "
                        "tokens, bytes, batches, split, documents (split all), checkpoint, "
                        "step")
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
                   args.checkpoint, config_dir=args.config_dir)
    messages = Messages()
    for warning in run.warnings:
        messages.warning(warning)
    messages.info(run.threads)
    split = args.split or ("all" if any(key(o) in NAMING for o in overrides) else "validation")
    if split == "all":
        seqs = data.load_whole(run.cfg.data, run.tokenizer)
        documents = {"documents": len(seqs.seqs.offsets) - 1}
    else:
        seqs = data.load(run.cfg.data, run.cfg.tokenizer, tokenizer=run.tokenizer)[split]
        documents = {}
    batch_size = run.cfg.data.batch_size
    n = len(seqs)
    if args.max_sequences is not None:
        n = min(n, args.max_sequences)
    if args.max_batches is not None:
        n = min(n, args.max_batches * batch_size)
    batches = micro_batches(n, batch_size)
    but = "" if run.cfg.data.packing else " but a document's first"
    what = (f"{split} split: {n:,} of its {len(seqs):,} sequences of {seqs.seq_len} tokens"
            if split != "all" else
            f"all {documents['documents']:,} documents, none held out, each token{but} a "
            f"target once: {n:,} of {len(seqs):,} sequences of up to {seqs.seq_len} tokens")
    messages.info(f"{run.checkpoint} (update {run.step}), {run.device}, {run.precision.mode}; "
                  f"{what}, in {len(batches)} batch(es) of {batch_size}")
    total = sequence_losses(run.model, seqs, batches, n, run.device, run.precision).sum()
    targets = seqs.num_targets(np.arange(n))
    sizes = run.tokenizer.token_bytes()
    n_bytes = 0
    for idx in batches:
        y = seqs.batch(idx)[1].numpy()
        n_bytes += int(sizes[y[y != data.IGNORE]].sum())
    loss = (total / targets).item()  # as the run's validation computes it
    nats = total.item()
    result = {"loss": loss, "perplexity": math.exp(loss),
              "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else math.nan,
              "sequences": n, "tokens": targets, "bytes": n_bytes, "batches": len(batches),
              "split": split, **documents, "checkpoint": str(run.checkpoint), "step": run.step}
    show(result, args.json)


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
