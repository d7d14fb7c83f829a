"""Signals during training (SPEC §7).

SIGINT, SIGTERM, SIGUSR1: the current update finishes, a checkpoint is written, the run
exits with 128 + the signal's number; a second such signal exits at once. SIGHUP (the SSH
session closed without nohup or tmux): training goes on, the terminal is no longer
written to, train.log still is.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
IGNORABLE = (signal.SIGINT, signal.SIGHUP)


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
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self) -> int:
        return 128 + self.requested


def name(signum: int) -> str:
    return signal.Signals(signum).name
