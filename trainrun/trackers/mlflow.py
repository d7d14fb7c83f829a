"""MLflow (`trainrun[mlflow]`): a run in MLflow's tracking store, by default MLflow's own
local one (`sqlite:///mlflow.db` in the working directory; MLFLOW_TRACKING_URI if set).

The run is named by the run directory and tagged with its identity; a sweep's jobs share an
experiment named by the sweep directory, other runs the experiment `trainrun` (or
MLFLOW_EXPERIMENT_NAME). The scalars of the updates between two records are sent as one
batch at the record, through MLflow's asynchronous logging (its own queue and thread): the
update path makes no call into the store.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from trainrun.trackers.base import Tracker, numbers, tracker

STATUS = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
BATCH = 1000  # MLflow's limit of metrics per log_batch (and 100 params)


@tracker
@dataclass
class MLflow(Tracker):
    name = "mlflow"
    package = "mlflow"
    pending: list = field(init=False, default_factory=list)
    queued: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()
        uri = self.client.tracking_uri
        if self.saved_id is not None:
            self.client.update_run(self.saved_id, status="RUNNING")  # raises if it is gone
            self.id = self.saved_id
        else:
            tags = self.identity.tags()
            experiment = self.identity.sweep or os.environ.get("MLFLOW_EXPERIMENT_NAME",
                                                               "trainrun")
            run = self.client.create_run(self._experiment(experiment), tags=tags,
                                         run_name=self.identity.run_dir)
            self.id = run.info.run_id
            self._params()
        self.where = f"run {self.id} in {uri} (to look: mlflow ui --backend-store-uri {uri})"

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def _params(self) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in self.params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.id, params=items[i:i + 100])

    def log(self, values: dict[str, float], k: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.pending += [Metric(key, float(v), ms, k) for key, v in values.items()]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), BATCH):
            self.queued.append(self.client.log_batch(self.id, metrics=pending[i:i + BATCH],
                                                     synchronous=False))
        done = [q for q in self.queued if _done(q)]
        self.queued = [q for q in self.queued if q not in done]
        for operation in done:
            operation.wait()  # raises what a queued write met: the tracker is then dropped

    def finish(self, summary: dict, status: str) -> None:
        self.flush()
        for operation in self.queued:
            operation.wait()  # raises what the queued writes met
        final = numbers(summary)
        self.log({f"summary/{k}": v for k, v in final.items()}, summary.get("steps") or 0)
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, metrics=self.pending, tags=[
            RunTag("trainrun.status", str(summary.get("status")))])
        self.pending = []
        self.client.set_terminated(self.id, STATUS.get(status, "FAILED"))


def _done(operation) -> bool:
    """Whether an asynchronous log_batch has been written (its result is then dropped)."""
    futures = getattr(operation, "_operation_futures", None)
    return futures is not None and all(f.done() for f in futures)
