"""trackio (`trainrun[trackio]`): a run in trackio's local database, one SQLite file per
project under TRACKIO_DIR (by default $HF_HOME/trackio, ~/.cache/huggingface/trackio);
`trackio show` serves its dashboard. It uploads only when told to (TRACKIO_SPACE_ID,
TRACKIO_SERVER_URL).

The project is `trainrun` (or TRACKIO_PROJECT); the run is named by the run directory, and
a sweep's jobs share the group named by the sweep directory. trackio's Run.log queues
each call for its own thread, which writes the database.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

from trainrun.trackers.base import Tracker, numbers, tracker


@tracker
@dataclass
class Trackio(Tracker):
    name = "trackio"
    package = "trackio"

    def __post_init__(self) -> None:
        import trackio

        self.project = os.environ.get("TRACKIO_PROJECT", "trainrun")
        # the config too when continuing: trackio replaces a run's config when it reopens it
        config = {**self.params, "trainrun": self.identity.tags()}
        with contextlib.redirect_stdout(io.StringIO()):  # its banner: the log has `where`
            self.run = trackio.init(
                project=self.project, name=self.saved_id or self.identity.run_dir,
                group=self.identity.sweep, config=config,
                resume="must" if self.saved_id else "never",
                auto_log_gpu=False, auto_log_cpu=False)
        self.id = self.run.name
        from trackio.utils import TRACKIO_DIR

        self.where = (f"run {self.id} of project {self.project} in {TRACKIO_DIR} (to look: "
                      f"trackio show --project {self.project})")

    def send(self, values: dict[str, float], k: int) -> None:
        self.run.log(values, step=k)

    def finish(self, summary: dict, status: str) -> None:
        self.flush()
        self.run.log({f"summary/{k}": v for k, v in numbers(summary).items()},
                     step=summary.get("steps") or 0)
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
