"""The faults that tests inject into a real run through the environment, read here and
nowhere else. Each is off unless its variable is set; none changes what a run computes.

    TRAINRUN_SAVE_FAIL_ENOSPC_AT=K    the save of checkpoint K fails as on a full disk
                                      (ENOSPC) while trainer_state.pt is written
                                      (trainrun.checkpoint)
    TRAINRUN_SAVE_PAUSE=SECONDS       every save pauses this long with its checkpoint half
                                      written: files there, not yet fsynced nor renamed into
                                      place (trainrun.checkpoint)
    TRAINRUN_BEST_PAUSE=SECONDS       trainer.keep_best pauses this long between its two
                                      renames of checkpoints/best/ (trainrun.cadence)
    TRAINRUN_SIGNAL_INSIDE=SIG:WHERE  the process sends itself SIG (SIGTERM, SIGINT, ...)
                                      when code named WHERE first runs during start-up, in
                                      any thread: a function `module.function` or a module
                                      (its import, or any of its functions), so that a stop
                                      lands inside a library on purpose rather than by timing
                                      (trainrun.signals)
    TRAINRUN_STREAM_STALL_AT=N        a stream's reading thread stalls before its chunk N
                                      (0-based, from where it started) until closed, and
                                      the process sends itself SIGTERM once the loop waits
                                      for those rows (trainrun.data.stream)
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

SAVE_FAIL_ENOSPC_AT = "TRAINRUN_SAVE_FAIL_ENOSPC_AT"
SAVE_PAUSE = "TRAINRUN_SAVE_PAUSE"
BEST_PAUSE = "TRAINRUN_BEST_PAUSE"
SIGNAL_INSIDE = "TRAINRUN_SIGNAL_INSIDE"
STREAM_STALL_AT = "TRAINRUN_STREAM_STALL_AT"


def disk_full_in_save(k: int, path: Path) -> None:
    """Raise the OSError of a full disk, writing `path`, in the save of checkpoint k when
    TRAINRUN_SAVE_FAIL_ENOSPC_AT names k."""
    if os.environ.get(SAVE_FAIL_ENOSPC_AT) == str(k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def pause_in_save() -> None:
    """Sleep TRAINRUN_SAVE_PAUSE seconds (0 when unset)."""
    time.sleep(float(os.environ.get(SAVE_PAUSE, "0")))


def pause_in_keep_best() -> None:
    """Sleep TRAINRUN_BEST_PAUSE seconds (0 when unset)."""
    time.sleep(float(os.environ.get(BEST_PAUSE, "0")))


def signal_inside() -> tuple[str, str] | None:
    """(the signal's name, where) of TRAINRUN_SIGNAL_INSIDE; None when it is unset."""
    value = os.environ.get(SIGNAL_INSIDE)
    if not value:
        return None
    sig, _, where = value.partition(":")
    return sig, where


def stream_stall_at() -> int | None:
    """N of TRAINRUN_STREAM_STALL_AT; None when it is unset."""
    value = os.environ.get(STREAM_STALL_AT)
    return int(value) if value else None


def stop_while_stalled() -> None:
    """SIGTERM to this process: the loop waits on a stalled stream (TRAINRUN_STREAM_STALL_AT)."""
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
