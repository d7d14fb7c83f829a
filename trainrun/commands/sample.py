"""`trainrun-sample RUN_DIR [PROMPT]`: text from a run's checkpoint, streamed as it comes
(trainrun.after.sample generates it).

The prompt (an argument, `--prompt-file`, or `-` for stdin) is read after an end-of-document
id, as the start of a document; each sample ends at --max-new-tokens or at the end of a
document; an id is drawn from a generator seeded with --seed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import torch

from trainrun.after.output import Messages, Parser, run_command
from trainrun.after.run import arguments, open_run, thread_overrides, threads_argument
from trainrun.after.sample import generate, picker
from trainrun.errors import ConfigError

PROG = "trainrun-sample"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Generate text from the newest intact checkpoint of a "
                                      "run (or --checkpoint), streaming it to stdout; "
                                      "tokens/s on stderr. A sample ends after "
                                      "--max-new-tokens or at the end of a document.",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"examples:\n  {PROG} outputs/2026-11-21/14-03-12 'def '\n"
                      f"  {PROG} RUN_DIR - --temperature 0 --max-new-tokens 50 < prompt.txt\n"
                      f"  {PROG} RUN_DIR 'import ' --top-k 40 --top-p 0.9 --num-samples 3 "
                      f"--seed 1")
    arguments(p)
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="text to continue; '-' reads it from stdin (default: none, a new "
                        "document)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens per sample at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="draw from the K most likely ids; 0: all (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="draw from the most likely ids that reach probability P; 1: all "
                        "(default)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="default 1")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text "
                                                       "(default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="default: the run's trainer.device")
    threads_argument(p)
    return p


def check(args: argparse.Namespace) -> None:
    for name, ok, allowed in (
            ("--max-new-tokens", args.max_new_tokens >= 1, "an integer >= 1"),
            ("--num-samples", args.num_samples >= 1, "an integer >= 1"),
            ("--temperature", math.isfinite(args.temperature) and args.temperature >= 0,
             "a number >= 0 (0: greedy)"),
            ("--top-k", args.top_k >= 0, "an integer >= 0 (0: no cut)"),
            ("--top-p", 0 < args.top_p <= 1, "0 < top_p <= 1"),
            ("--seed", 0 <= args.seed < 2**63, "0 <= seed < 2**63")):
        if not ok:
            value = getattr(args, name[2:].replace("-", "_"))
            raise ConfigError(name, f"got {value}; allowed: {allowed}")
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("--prompt-file", "a PROMPT was given too; allowed: one of them")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ConfigError("--prompt-file", f"{args.prompt_file}: {why}; allowed: a UTF-8 "
                                               f"text file") from None
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt or ""


def sample(args: argparse.Namespace, overrides: list[str]) -> None:
    check(args)
    prompt = read_prompt(args)
    device = [f"trainer.device={args.device}"] if args.device else []
    run = open_run(args.run_dir, [*device, *thread_overrides(args.threads)], args.checkpoint,
                   data=False, config_dir=args.config_dir, weights=args.weights, task="lm")
    messages = Messages()
    for warning in run.warnings:
        messages.warning(warning)
    messages.info(run.threads)
    tok = run.tokenizer
    ids = [tok.eot, *tok.encode(prompt)]
    window = run.cfg.model.max_seq_len
    if len(ids) > window:
        messages.warning(f"the prompt has {len(ids) - 1} tokens; the model reads its last "
                         f"{window} (model.max_seq_len)")
    messages.info(f"{run.checkpoint} (update {run.step}), {run.device}, {run.precision.mode}; "
                  f"temperature {args.temperature:g}, top_k {args.top_k}, top_p {args.top_p:g}, "
                  f"seed {args.seed}")
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    pick = picker(args.temperature, args.top_k, args.top_p, tok.vocab_size, generator)
    terminal = None
    if sys.stdout.isatty():
        from rich.console import Console

        terminal = Console(highlight=False, soft_wrap=True)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---", flush=True)
        if terminal is not None:
            terminal.print(prompt, style="bold", markup=False, end="")
        else:
            sys.stdout.write(prompt)
        decode, n, ended = tok.streamer(), 0, False
        started = time.perf_counter()
        for token in generate(run.model, ids, args.max_new_tokens, pick, run.precision.autocast):
            n += 1
            if token == tok.eot:
                ended = True
                break
            sys.stdout.write(decode(token))
            sys.stdout.flush()
        seconds = time.perf_counter() - started
        print(flush=True)
        messages.info(f"{n} tokens in {seconds:.2f}s, {n / seconds:,.1f} tokens/s"
                      + (" (ended at the end of a document)" if ended else ""))


def main(argv: Sequence[str] | None = None) -> None:
    run_command(PROG, argv, parser(), sample)


if __name__ == "__main__":
    main()
