"""What the commands after training share about their input and output: argument errors as
the one line of bad input (argparse's own print the usage too; docs/design.md, Bad input),
and messages on stderr, rich on a terminal and plain lines otherwise, so that stdout holds
only the command's output (text, results, JSON) and can be piped."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from trainrun.composition.explain import fail
from trainrun.errors import ConfigError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        named = re.fullmatch(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        if named:
            raise ConfigError(named[1], named[2])
        raise ConfigError("arguments", message)


def run_command(prog: str, argv: Sequence[str] | None, parser: Parser,
                command: Callable[[argparse.Namespace, list[str]], None],
                overrides: bool = False) -> None:
    """Parse argv (key=value words are the overrides, where the command takes them) and run
    the command; a ConfigError from either is one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if overrides:
            args, extra = parser.parse_known_args(argv)
            bad = [a for a in extra if a.startswith("-") or "=" not in a]
            if bad:
                raise ConfigError("arguments", f"unrecognized: {' '.join(bad)}; allowed: the "
                                               f"options of --help and key=value overrides")
        else:
            args, extra = parser.parse_args(argv), []
        command(args, extra)
    except ConfigError as error:
        fail(error, prog)
    except BrokenPipeError:  # `trainrun-sample ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Messages:
    """Status lines on stderr: rich on a terminal, plain otherwise."""

    def __init__(self):
        self.rich = None
        if sys.stderr.isatty():
            from rich.console import Console

            self.rich = Console(stderr=True, highlight=False)

    def info(self, text: str) -> None:
        if self.rich is not None:
            self.rich.print(text, style="dim", markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def warning(self, text: str) -> None:
        if self.rich is not None:
            self.rich.print(f"warning: {text}", style="yellow", markup=False)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)
