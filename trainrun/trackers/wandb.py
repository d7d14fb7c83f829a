"""Weights & Biases (`trainrun[wandb]`): a W&B run, offline unless the user chose otherwise
(WANDB_MODE): offline, it is written under W&B's
folder (WANDB_DIR, by default ./wandb) and the run's log says the `wandb sync` command that
uploads it.

The run is named by the run directory, its config is the run's flat config plus its
identity under `trainrun`; a sweep's jobs share the group named by the sweep directory.
wandb.log hands each call to W&B's own service process, which queues and writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainrun.trackers.base import Tracker, tracker


@tracker
@dataclass
class WandB(Tracker):
    name = "wandb"
    package = "wandb"

    def __post_init__(self) -> None:
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else "offline"  # None: the user's
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "trainrun"), name=self.identity.run_dir,
            group=self.identity.sweep, job_type="train", mode=mode,
            dir=os.environ.get("WANDB_DIR"),  # read per run: W&B reads it once a process
            id=self.saved_id, resume="must" if self.saved_id else None,
            config={**self.params, "trainrun": self.identity.tags()},
            settings=wandb.Settings(silent=True, console="off"))
        self.id = self.run.id
        if self.run.offline:
            folder = os.path.relpath(self.run.settings.sync_dir)
            self.where = f"offline run {self.id} in {folder} (to upload: wandb sync {folder})"
        else:
            self.where = f"run {self.id}: {self.run.url}"

    def send(self, values: dict[str, float], k: int) -> None:
        self.run.log(values, step=k)

    def finish(self, summary: dict, status: str) -> None:
        self.flush()
        self.run.summary.update({f"summary/{k}": v for k, v in summary.items()})
        self.run.finish(exit_code=0 if status == "completed" else 1)

