"""`trainrun-translate RUN_DIR [FILE|-]`: a translation run's checkpoint translates text, a
sentence per line, to stdout, a translation per line in the input's order
(trainrun.translate decodes them: beam search, or greedy with --beam 1); tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from trainrun import translate
from trainrun.after.output import Messages, Parser, run_command
from trainrun.after.run import arguments, open_run, thread_overrides, threads_argument
from trainrun.errors import ConfigError

PROG = "trainrun-translate"


def parser() -> Parser:
    p = Parser(prog=PROG, description="Translate a file (or stdin), a sentence per line, with "
                                      "the newest intact checkpoint of a translation run (or "
                                      "--checkpoint); a translation per line on stdout, "
                                      "tokens/s on stderr.",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"examples:\n  {PROG} outputs/2026-12-05/10-00-00 test.de > test.hyp.en\n"
                      f"  echo 'Ein Hund rennt.' | {PROG} RUN_DIR - --beam 1\n"
                      f"  {PROG} RUN_DIR test.de --beam 5 --length-penalty 1.0 "
                      f"--checkpoint average-00000008-00000010")
    arguments(p)
    p.add_argument("file", metavar="FILE", nargs="?", default="-",
                   help="the sentences, one per line (UTF-8); '-' or none: stdin")
    translate.search_arguments(p, beam=4)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="default: the run's trainer.device")
    threads_argument(p)
    return p


def read_lines(name: str) -> list[str]:
    if name == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(name, encoding="utf-8", newline="") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ConfigError("FILE", f"{name}: {why}; allowed: a UTF-8 text file, a sentence "
                                      f"per line, or - for stdin") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    search = translate.search_of(args)
    device = [f"trainer.device={args.device}"] if args.device else []
    opened = open_run(args.run_dir, [*device, *thread_overrides(args.threads)], args.checkpoint,
                      data=False, config_dir=args.config_dir, weights=args.weights,
                      task="translation")
    lines = read_lines(args.file)
    messages = Messages()
    for warning in opened.warnings:
        messages.warning(warning)
    messages.info(opened.threads)
    how = "greedy" if search.beam == 1 else (f"beam {search.beam}, length penalty "
                                             f"{search.length_penalty:g}")
    messages.info(f"{opened.checkpoint} (update {opened.step}), {opened.device}, "
                  f"{opened.precision.mode}; {len(lines):,} sentence(s), {how}")
    started = time.perf_counter()
    out, done = translate.translate_lines(opened.model, opened.tokenizer, lines, search,
                                          opened.precision.autocast)
    seconds = time.perf_counter() - started
    sys.stdout.write("".join(f"{line}\n" for line in out))
    sys.stdout.flush()
    if done.cut:
        messages.warning(f"{done.cut} sentence(s) longer than the model's "
                         f"{opened.cfg.model.max_seq_len} positions were cut to them")
    messages.info(f"{len(lines):,} sentence(s), {done.tokens:,} tokens in {seconds:.2f}s, "
                  f"{done.tokens / max(seconds, 1e-9):,.1f} tokens/s")


def main(argv: Sequence[str] | None = None) -> None:
    run_command(PROG, argv, parser(), run)


if __name__ == "__main__":
    main()
