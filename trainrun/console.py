"""What the user sees, and train.log.

On a terminal: the resolved config, a rich progress bar (update k/N, loss, last val_loss,
lr, tokens/s, ETA) and messages above it, validation results among them. Elsewhere
(nohup, a file, CI): the same messages, and plain one-line records every log_every
updates, with no colour codes and no carriage returns. Every message and record also goes
to train.log as plain text.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from logging.handlers import MemoryHandler
from pathlib import Path

from trainrun import rundir
from trainrun.errors import out_of_space

RECORD = {"record": True}  # `extra` of a per-log_every record: the bar shows it on a terminal


class _NotRecords(logging.Filter):
    def filter(self, rec: logging.LogRecord) -> bool:
        return not getattr(rec, "record", False)


class _LogFile(logging.FileHandler):
    """train.log, opened without following a link (trainrun.rundir.append). On a full disk
    a line that cannot be written is dropped without logging's traceback on stderr: the run
    reports the full disk itself, in one line."""

    def __init__(self, path: Path, within: Path):
        self.within = within
        super().__init__(path, encoding="utf-8")

    def _open(self):
        return rundir.append(Path(self.baseFilename), self.within)

    def handleError(self, record: logging.LogRecord) -> None:
        if out_of_space(sys.exc_info()[1]) is None:
            super().handleError(record)


class Console:
    """With no log_path, lines are held in memory until `open_log()` writes them, so that a
    run refused while it is being built leaves no train.log behind. A `silent` console (the
    ranks other than 0 of a distributed run) shows and writes nothing."""

    def __init__(self, log_path: Path | None = None, interactive: bool | None = None,
                 silent: bool = False):
        self.silent = silent
        self.interactive = (sys.stdout.isatty() if interactive is None else interactive) \
            and not silent
        self.tty_fds = [fd for fd in (1, 2) if os.isatty(fd)]  # a hung-up tty no longer says so
        self.log = logging.getLogger("trainrun.run")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        self.file_handler: logging.Handler = logging.NullHandler() if silent else \
            MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        self.log.addHandler(self.file_handler)
        if log_path is not None:
            self.open_log(log_path)
        self.progress = None
        if self.interactive:
            from rich.console import Console as RichConsole
            from rich.logging import RichHandler

            self.rich = RichConsole()
            self.term_handler = RichHandler(console=self.rich, show_path=False, markup=False)
            self.term_handler.addFilter(_NotRecords())
        else:
            self.rich = None
            self.term_handler = logging.NullHandler() if silent else logging.StreamHandler(sys.stdout)
            self.term_handler.setFormatter(logging.Formatter("%(message)s"))
        self.log.addHandler(self.term_handler)

    def open_log(self, log_path: Path, within: Path | None = None) -> None:
        """Start writing train.log (appending), beginning with the lines held so far;
        `within`: the run directory (default: the log's folder), below which no link is
        followed."""
        if self.silent:
            return
        held = self.file_handler
        self.file_handler = _LogFile(log_path, within or log_path.parent)
        self.file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        held.setTarget(self.file_handler)
        held.flush()
        self.log.removeHandler(held)
        held.close()
        self.log.addHandler(self.file_handler)

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        self.log.warning(msg)

    def command(self, msg: str, command: str) -> None:
        """A message ending in a shell command to copy: on a terminal the command gets a
        line of its own, never wrapped (rich would break a long path across lines)."""
        if self.rich is None:
            self.info(f"{msg} {command}")
            return
        self.file_handler.handle(self.log.makeRecord(
            self.log.name, logging.INFO, __file__, 0, f"{msg} {command}", None, None))
        if self.term_handler in self.log.handlers:  # the terminal is still there
            self.rich.print(msg, markup=False, highlight=False)
            self.rich.print(command, soft_wrap=True, markup=False, highlight=False)

    def record(self, msg: str) -> None:
        """A per-log_every record: train.log always; the terminal only when not interactive."""
        self.log.info(msg, extra=RECORD)

    def config(self, yaml_text: str) -> None:
        self.file_handler.handle(self.log.makeRecord(
            self.log.name, logging.INFO, __file__, 0, "config:\n" + yaml_text, None, None))
        if self.rich is not None:
            from rich.syntax import Syntax

            self.rich.print(Syntax(yaml_text, "yaml", theme="ansi_dark"))

    def start_progress(self, total: int, completed: int) -> None:
        if self.rich is None:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("update"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss {task.fields[loss]}  val_loss {task.fields[val]}  "
                       "lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.rich,
        )
        self.task = self.progress.add_task("train", total=total, completed=completed,
                                           loss="-", val="-", lr="-", tps="-")
        self.progress.start()

    @contextlib.contextmanager
    def bytes_bar(self, description: str, total: int | None):
        """A transient bar of `total` bytes (done/total MB, MB/s, time left) on a terminal,
        for work before training (tokenizing); yields the function that advances it by n
        bytes. Elsewhere it yields None: the caller writes plain lines (trainrun.data.storage.Bar)."""
        if self.rich is None or self.term_handler not in self.log.handlers:
            yield None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(TextColumn(description), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                       console=self.rich, transient=True)
        task = bar.add_task(description, total=total)
        bar.start()
        try:
            yield lambda n: bar.advance(task, n)
        finally:
            with contextlib.suppress(OSError, ValueError):  # a terminal gone meanwhile (SIGHUP)
                bar.stop()

    def advance(self, k: int, **fields: str) -> None:
        """Move the bar to update k, with new loss/val/lr/tps text where given."""
        if self.progress is not None:
            self.progress.update(self.task, completed=k, **fields)

    def detach_terminal(self) -> None:
        """After SIGHUP: stop writing to the terminal, which is gone; a file or pipe that
        stdout/stderr point to is still written, and so is train.log."""
        ttys, self.tty_fds = self.tty_fds, []
        if not ttys:
            return
        devnull = open(os.devnull, "w")
        for fd in ttys:
            os.dup2(devnull.fileno(), fd)  # also silences C-level writes
        if 1 in ttys:
            self.log.removeHandler(self.term_handler)
            progress, self.progress = self.progress, None
            if progress is not None:
                progress.console.file = devnull
                with contextlib.suppress(OSError, ValueError):
                    progress.stop()
        self.log.warning("SIGHUP: the terminal is gone; training goes on, logging to train.log")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        for handler in (self.file_handler, self.term_handler):
            self.log.removeHandler(handler)
            try:
                handler.close()
            except OSError as error:  # train.log's last lines on a full disk: dropped
                if out_of_space(error) is None:
                    raise
