"""The sweep summary as Hydra callbacks (`hydra.callbacks.sweep_summary` in conf/config.yaml),
so that it works with every sweeper and launcher.

on_job_end runs in the process that ran the job (a joblib worker, a submitit task): it
leaves the job's record in the sweep directory and rewrites summary.csv with the rows so
far. on_multirun_end runs once, in the process that started the sweep, after every job:
it writes summary.csv from every record and each job's metrics.json and prints the table
(trainrun/sweep.py builds both), and keeps the line that says how many jobs failed, with
which `trainrun` then exits 1 (`failures`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from trainrun import sweep


def sweep_dir(config: DictConfig) -> Path:
    """The sweep directory, absolute: jobs may run in another working directory."""
    return Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)


def main_process() -> bool:
    """False on the other ranks of a distributed job (srun's tasks, torchrun's workers),
    read from the environment as the process group reads it: rank 0 reports the job."""
    from trainrun.ranks import slurm_environment

    env = {**os.environ, **slurm_environment(dict(os.environ))}
    return int(env.get("RANK", "0")) == 0


_ended: dict[str, str | None] = {"failures": None}


def failures() -> str | None:
    """`N of M jobs failed; see <summary.csv>` for the sweep this process ran, if any job
    failed; None otherwise (also when no sweep ended here)."""
    return _ended["failures"]


class SweepSummary(Callback):
    """`sort_by`: the figure the table is sorted by, best first (sweep.SORTS:
    hydra.callbacks.sweep_summary.sort_by=val_bleu for translation runs)."""

    def __init__(self, sort_by: str = "best_val_loss"):
        from trainrun.errors import require_in

        require_in("hydra.callbacks.sweep_summary.sort_by", sort_by, tuple(sweep.SORTS))
        self.sort_by = sort_by

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep.forget(sweep_dir(config))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.mode != RunMode.MULTIRUN or not main_process():
            return
        if job_return.status == JobStatus.COMPLETED:
            error = getattr(job_return.return_value, "error", None)
            status = getattr(job_return.return_value, "status", None)
            same_as = getattr(job_return.return_value, "same_as", None)
        else:  # raised past the job function: Hydra holds the exception as the return value
            error = f"failed: {sweep.error_line(job_return._return_value)}"
            status, same_as = "failed", None
        folder = sweep_dir(config)
        sweep.record(folder, hydra.job.num, list(job_return.overrides or []),
                     Path(hydra.runtime.output_dir), error, status, same_as)
        # the rows so far: a sweep that ends early (a signal, a killed job) still has them
        sweep.write_csv(sweep.rows(folder, self.sort_by), folder / "summary.csv")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from rich.console import Console

        folder = sweep_dir(config)
        table = sweep.rows(folder, self.sort_by)
        if not table:
            return
        path = folder / "summary.csv"
        sweep.write_csv(table, path)
        _ended["failures"] = sweep.failures(table, path)
        console = Console()
        rendered = sweep.render(table, folder, self.sort_by)
        if not console.is_terminal:  # a log file keeps whole rows rather than wrapping at 80
            natural = Console(width=100_000).measure(rendered).maximum
            console = Console(width=max(console.width, natural))
        console.print(rendered)
        for line in sweep.footer(table, path):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
