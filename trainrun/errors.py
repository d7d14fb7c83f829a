"""The one error that bad input raises, the checks most keys share, and what counts as a
full disk (which fails a run in one line too, not with a traceback)."""

from __future__ import annotations

import errno
import math
from typing import Any


class ConfigError(ValueError):
    """Bad input: `key` is the dotted config key, `message` says what is wrong and allowed.

    The CLI prints it as one line, `trainrun: error: <key>: <message>`, and exits with 2.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class NotTrainrun(ValueError):
    """A file of a run directory that is not what trainrun writes there (another program's,
    or edited by hand), found while reading it. str() is one line naming the file and what
    is wrong; the command that read it reports it as a ConfigError of its own key."""


def reason(error: BaseException) -> str:
    """The line of an exception's message that says what is wrong: not a heading ending in
    ':' ("Error(s) in loading state_dict for GPT:"), nor torch.load's advice about
    weights_only; the exception's type when it says nothing else."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    said = [line.strip() for line in str(error).splitlines()]
    said = [line for line in said if line and not line.endswith(":") and not line.startswith(advice)]
    return said[0] if said else type(error).__name__


def require_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """A finite number > 0 (or >= 0 with allow_zero)."""
    ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"got {value}; allowed: a finite number {bound}")


def require_range(key: str, value: float, low: float, high: float) -> None:
    """low <= value <= high."""
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(key, f"got {value}; allowed: {low} <= {key.rsplit('.', 1)[-1]} <= {high}")


def require_in(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def out_of_space(error: BaseException | None) -> OSError | None:
    """The OSError ENOSPC or EDQUOT (disk or quota full) behind `error`, else None. It may
    be `error` itself or what it was raised from or while handling: torch.save, for one,
    reports a full disk as a RuntimeError raised while the OSError propagates."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None
