"""Signals during training (SPEC §7).

SIGINT, SIGTERM, SIGUSR1: the current update finishes, a checkpoint is written, the run
exits with 128 + the signal's number; a second such signal exits at once. SIGHUP (the SSH
session closed without nohup or tmux): training goes on, the terminal is no longer
written to, train.log still is.

Before training (`catch_startup`, from the command's first line): a stop signal raises
StartupStop, which ends the command with one line and 128 + the signal's number. Between
the built run and training the stop signals are held back (`hold`) and delivered to
Signals, so that a run that has started writing its directory always ends as a stopped run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
IGNORABLE = (signal.SIGINT, signal.SIGHUP)


class StartupStop(BaseException):
    """A stop signal before training started (a BaseException, as KeyboardInterrupt is, so
    that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        when = ("before the first update" if _startup["training"] is None
                else "between updates' work (no update lost)")
        return f"{name(self.signum)}: stopped {when}"


_startup: dict = {"received": None, "training": None, "run_dir": None}


def _during_startup(signum, frame) -> None:
    if _startup["received"] is not None:
        os._exit(128 + signum)  # the second signal: at once
    _startup["received"] = signum
    _startup["run_dir"] = _hydra_output_dir()
    raise StartupStop(signum)


def _hydra_output_dir() -> str | None:
    """The directory of the job Hydra is starting, if it is starting one (Hydra makes it
    before the run is built, and forgets it once the job has ended)."""
    hydra_config = sys.modules.get("hydra.core.hydra_config")
    if hydra_config is None or not hydra_config.HydraConfig.initialized():
        return None
    try:  # a signal handler raises nothing but StartupStop
        return hydra_config.HydraConfig.get().runtime.output_dir
    except Exception:  # composed, but not yet given a directory ('???'): none made yet
        return None


def startup_run_dir() -> str | None:
    """The run directory Hydra had made or was making when a start-up signal came."""
    return _startup["run_dir"]


def catch_startup() -> None:
    """Stop signals raise StartupStop from now on (but those a shell or nohup ignores)."""
    for sig in STOP_SIGNALS:
        if sig in IGNORABLE and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        signal.signal(sig, _during_startup)


def hold() -> None:
    """Hold back stop signals until Signals is entered (which delivers them to itself)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release() -> None:
    """Undo hold() (a run that failed before training)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def deferred():
    """Stop signals wait until the block is done (then arrive as before): for steps that
    must not be cut in half, such as making a run directory and recording that it was
    made, so that a stop can remove it again."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Signals:
    def __init__(self, on_hangup: Callable[[], None]):
        self.requested: int | None = None  # the first stop signal received
        self.on_hangup = on_hangup
        self._previous: dict[int, object] = {}

    def _stop(self, signum, frame) -> None:
        if self.requested is not None:
            os._exit(128 + signum)  # the second signal: at once
        self.requested = signum

    def _hangup(self, signum, frame) -> None:
        self.on_hangup()

    def __enter__(self) -> Signals:
        handlers = {sig: self._stop for sig in STOP_SIGNALS} | {signal.SIGHUP: self._hangup}
        for sig, handler in handlers.items():
            # nohup ignores SIGHUP, and a shell's background job SIGINT: keep it that way
            if sig in IGNORABLE and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, handler)
        # a start-up signal that a library caught on the way stops this run too
        self.requested = _startup["received"]
        _startup["training"] = True
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held ones arrive here
        return self

    def __exit__(self, *exc) -> None:
        _startup["training"] = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self) -> int:
        return 128 + self.requested


def name(signum: int) -> str:
    return signal.Signals(signum).name
