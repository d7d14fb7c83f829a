"""Signals during training (docs/long-jobs.md, Signals).

SIGINT, SIGTERM, SIGUSR1: the current update finishes, a checkpoint is written, the run
exits with 128 + the signal's number; a second such signal exits at once. SIGHUP (the SSH
session closed without nohup or tmux): training goes on, the terminal is no longer
written to, train.log still is.

Before training (`catch_startup`, from the command's first line): a stop signal raises
StartupStop, which ends the command with one line and 128 + the signal's number. It is
raised only into code that expects it (trainrun's, Hydra's, OmegaConf's, Python's own, and
no import under way): a signal that lands inside a library (importing torch, `datasets`
loading the data) is recorded, and `check()`, which trainrun calls between its start-up
phases, raises it once the library's call has returned. Between the built run and training
the stop signals are held back (`hold`) and delivered to Signals, so that a run that has
started writing its directory always ends as a stopped run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

from trainrun import faults

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


_startup: dict = {"received": None, "pending": False, "training": None, "run_dir": None}

# The packages a start-up stop may be raised into (besides Python's standard library): the
# way out of their code is trainrun's own or known to unwind cleanly.
RAISE_INTO = ("trainrun", "hydra", "omegaconf", "__main__")


def _during_startup(signum, frame) -> None:
    if _startup["received"] is not None:
        os._exit(128 + signum)  # the second signal: at once
    _startup["received"] = signum
    if not interruptible(frame):
        _startup["pending"] = True  # raised by the next check(), out of the library's code
        return
    raise _stop(signum)


def check() -> None:
    """Raise StartupStop if a start-up stop signal landed inside a library's code and has
    not been acted on; a no-op otherwise (and in commands that do not catch_startup)."""
    if _startup["pending"]:
        _startup["pending"] = False
        raise _stop(_startup["received"])


def _stop(signum: int) -> StartupStop:
    _startup["run_dir"] = _hydra_output_dir()
    return StartupStop(signum)


def interruptible(frame) -> bool:
    """Whether an exception raised in `frame` unwinds only code that expects one: every
    frame of the stack runs code of RAISE_INTO or of the standard library, and none is
    importing a module (an import cut short leaves a half-made module that the way out may
    use). Anything else is a library whose state a raise could break mid-way (`datasets`
    patches modules while it loads)."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        importing = module.startswith("importlib") or (frame.f_code.co_name == "<module>"
                                                       and module != "__main__")
        known = module.partition(".")[0] in (*RAISE_INTO, *sys.stdlib_module_names)
        if importing or not known:
            return False
        frame = frame.f_back
    return True


def _hydra_output_dir() -> str | None:
    """The directory of the job Hydra is starting, if it is starting one (Hydra makes it
    before the run is built, and forgets it once the job has ended)."""
    try:  # a signal handler raises nothing but StartupStop
        hydra_config = sys.modules.get("hydra.core.hydra_config")
        if hydra_config is None or not hydra_config.HydraConfig.initialized():
            return None
        return hydra_config.HydraConfig.get().runtime.output_dir
    except Exception:  # not yet given a directory ('???'), or Hydra half imported: none made
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
    inside = faults.signal_inside()  # tests: SIGTERM:datasets.load.load_dataset
    if inside is not None:
        _signal_inside(*inside)


def _signal_inside(sig: str, where: str) -> None:
    """Tests: send this process `sig` when code named `where` first runs, a function
    (`module.function`) or a module (its import, or any of its functions), so that a stop
    lands inside a library on purpose rather than by timing."""
    sent = []

    def profile(frame, event, arg) -> None:
        module = frame.f_globals.get("__name__") or ""
        if not sent and event == "call" and (where in (module, f"{module}.{frame.f_code.co_name}")
                                             or module.startswith(f"{where}.")):
            sent.append(sig)
            sys.setprofile(None)
            threading.setprofile(None)
            os.kill(os.getpid(), signal.Signals[sig])

    sys.setprofile(profile)
    threading.setprofile(profile)  # and the threads started later (the tokenizing workers)


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
