"""What every tracker implements, and what it is told about the run it records.

A tracker is opened once per process that trains a run (rank 0 only), with the id of the
tracker run it opened before for this run directory (trackers.json), if any: it continues
that run, never starts a second one; and the run's flat config, which a new tracker run
records as its parameters. It then receives the scalars TensorBoard receives, at
the same updates, as `log(values, k)`; `flush()` at each record and validation (a tracker
that buffers the updates between records hands them to its library there, which queues
them); and at the end metrics.json's summary and the run's status. Errors are the caller's (trainrun.trackers.
Trackers): whatever a tracker raises drops it, with one warning, and training goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trainrun.registry import options_of, register

# tracker name -> its class, each registered where it is defined (@register("trackers", ...))
TRACKERS: dict[str, type[Tracker]] = options_of("trackers")


@dataclass(frozen=True)
class Identity:
    """Which run a tracker records: its directory (as given, also the tracker run's name),
    the command line's overrides, and for a sweep's job the sweep (its directory, as given:
    the group its jobs share) and the job's number and TensorBoard name."""

    run_dir: str
    overrides: tuple[str, ...] = ()
    sweep: str | None = None
    job: int | None = None
    job_name: str | None = None  # tb/<job_name>/: the job's swept overrides

    def tags(self) -> dict[str, str]:
        """The identity as flat string tags (`trainrun.run_dir`, ...), the empty ones left out."""
        tags = {"trainrun.run_dir": self.run_dir,
                "trainrun.overrides": " ".join(self.overrides)}
        if self.sweep is not None:
            tags |= {"trainrun.sweep": self.sweep, "trainrun.job": str(self.job),
                     "trainrun.job_name": self.job_name or ""}
        return {k: v for k, v in tags.items() if v}


@dataclass
class Tracker:
    """One tracker's run. Subclasses set `name` (the entry of `trackers`) and `package` (the
    module its extra installs, `trainrun[<name>]`), open or continue their run in __init__
    and set `id` (what trackers.json keeps to continue it) and `where` (one line for the
    run's log: where the record is and how to look at it)."""

    identity: Identity
    saved_id: str | None  # the tracker run this run directory opened before; None: a new one
    params: dict  # the run's config, flat (dotted keys): recorded once, in a new run
    id: str = field(init=False, default="")
    where: str = field(init=False, default="")
    pending: list = field(init=False, default_factory=list)  # log()'s, until flush()

    name: ClassVar[str]
    package: ClassVar[str]

    def log(self, values: dict[str, float], k: int) -> None:
        """Keep update k's scalars until flush(): an update calls no library."""
        self.pending.append((values, k))

    def flush(self) -> None:
        """Hand what log() buffered to the library (which may queue it further), at a
        record or a validation."""
        pending, self.pending = self.pending, []
        for values, k in pending:
            self.send(values, k)

    def send(self, values: dict[str, float], k: int) -> None:
        """Update k's scalars to the library."""
        raise NotImplementedError

    def finish(self, summary: dict, status: str) -> None:
        """metrics.json's summary, then end the tracker run as `status` (completed, stopped,
        failed) and wait for the library to write what it queued."""
        raise NotImplementedError


def tracker(cls: type[Tracker]) -> type[Tracker]:
    """A class decorator: register a Tracker under its `name`."""
    return register("trackers", cls.name)(cls)


def numbers(summary: dict) -> dict[str, float]:
    """The summary's numeric entries (what a tracker's metrics can hold), status left out."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
