"""The summary of a sweep (`trainrun -m`): one row per job, as a table and as summary.csv;
and what a job that fails gives back, so that the sweep goes on.

Each job leaves a small record, `<sweep dir>/.jobs/<job number>.json` (its overrides, run
directory, if it failed the error's one line, and if it was not run the job it repeats),
written in the process that ran it: jobs may run in other processes or on other machines
(joblib, submitit), so what they report travels through files. The rest of a row comes from
the job's own metrics.json (that of the job it repeats, for one not run).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import sys
from pathlib import Path

from trainrun import rundir

COLUMNS = ("job", "overrides", "status", "best_val_loss", "val_loss", "val_bleu", "steps",
           "skipped_updates", "wall_seconds", "tokens_per_sec", "parameters", "run_dir",
           "same_as", "error")
METRICS = ("status", "best_val_loss", "val_loss", "val_bleu", "steps", "skipped_updates",
           "wall_seconds", "tokens_per_sec", "parameters")
# what the table can be sorted by (hydra.callbacks.sweep_summary.sort_by), and which way:
# val_bleu is a translation run's last BLEU (trainer.bleu_every), higher first
SORTS = {"best_val_loss": 1, "val_loss": 1, "val_bleu": -1}
RECORDS = ".jobs"
SWEPT = "TRAINRUN_SWEPT_KEYS"  # the keys a basic sweep varies, for its jobs to read


def announce_swept(keys: set[str]) -> None:
    """Hand the keys a sweep varies to its jobs (through the environment, which joblib's
    workers and submitit's jobs inherit, as identical.announce does)."""
    os.environ[SWEPT] = json.dumps(sorted(keys))


def tb_name(overrides: list[str], searched: list[str]) -> str:
    """A sweep job's TensorBoard run name: its overrides of the swept keys (announced by the
    basic sweep, or `searched` by another sweeper), as written, in order; every override if
    none is known. One folder name: `/` becomes `_`, and a name past 120 characters ends in
    a hash of the whole."""
    import hashlib

    swept = set(json.loads(os.environ.get(SWEPT, "[]"))) | set(searched)
    shown = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
    name = ",".join(shown).replace("/", "_").replace("\\", "_") or "defaults"
    if len(name) > 120 or name in (".", ".."):
        name = f"{name[:110]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


class JobFailed(float):
    """What a failed job returns to Hydra's sweeper: inf (the worst loss, so that Optuna
    steers away from it), carrying the error's one line for the job's record."""

    status = "failed"

    def __new__(cls, error: str):
        value = super().__new__(cls, math.inf)
        value.error = error
        return value


class NotRun(JobFailed):
    """A job not run because it is identical to an earlier one, `same_as` (its number): not
    a failure; its row carries that job's results."""

    status = "identical"

    def __new__(cls, error: str, same_as: int | None = None):
        value = super().__new__(cls, error)
        value.same_as = same_as
        return value


def error_line(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def crashed(exc: Exception, job: int, run_dir: Path) -> str:
    """A job of a sweep raised: its traceback goes to stderr and to the end of its train.log
    (when it got that far), and the sweep goes on. Returns the error's one line."""
    import traceback

    text = "".join(traceback.format_exception(exc))
    log = run_dir / "train.log"
    if log.is_file() and not log.is_symlink():
        with rundir.append(log, within=run_dir) as f:
            f.write(text)
    line = f"failed: {error_line(exc)}"
    print(f"{text}trainrun: {line} (job {job}; the sweep goes on)", file=sys.stderr)
    return line


def record(sweep_dir: Path, job: int, overrides: list[str], run_dir: Path,
           error: str | None, status: str | None = None, same_as: int | None = None) -> None:
    """Write job's record (by rename: a summary read meanwhile never sees half a file);
    status: "failed" or "identical" when the job says so, else None (its metrics.json
    tells); same_as: the job an identical one repeats."""
    folder = sweep_dir / RECORDS
    sweep_dir.mkdir(parents=True, exist_ok=True)
    rundir.folder(folder, within=sweep_dir)
    rundir.write(folder / f"{job}.json", json.dumps({"job": job, "overrides": list(overrides),
                                                     "run_dir": str(run_dir), "error": error,
                                                     "status": status, "same_as": same_as})
                 + "\n", within=sweep_dir)


def forget(sweep_dir: Path) -> None:
    """Drop the records of an earlier sweep into the same directory."""
    for path in (sweep_dir / RECORDS).glob("*.json"):
        path.unlink()


def rows(sweep_dir: Path, sort_by: str = "best_val_loss") -> list[dict]:
    """One row per recorded job (COLUMNS; overrides as a list; a value never measured is
    None), best first: by `sort_by` (SORTS), then failed jobs and jobs without a finite
    figure, by job number. A job not run because it repeats another (status `identical`) has that
    job's results, its number in `same_as` and its run directory, and ranks beside it."""
    records = {}
    for path in (sweep_dir / RECORDS).glob("*.json"):
        job = json.loads(path.read_text())
        records[job["job"]] = job
    found, statuses = [], {}
    for job in records.values():
        same_as = job.get("same_as") if job.get("status") == "identical" else None
        ran = records.get(same_as, job)  # the job whose run holds the results
        metrics_path = Path(ran["run_dir"]) / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        row = {"job": job["job"], "overrides": job["overrides"],
               **{key: metrics.get(key) for key in METRICS},
               "run_dir": ran["run_dir"], "same_as": same_as, "error": job["error"]}
        if job.get("status") == "identical":  # not run: the job it repeats tells
            row["status"] = "identical"
        elif job["error"] is not None or not metrics:
            row["status"] = "failed"
            row["error"] = row["error"] or "failed: the job ended without writing metrics.json"
        statuses[job["job"]] = row["status"]
        found.append(row)
    return sorted(found, key=lambda row: rank(row, statuses.get(row["same_as"]), sort_by))


def rank(row: dict, repeated_status: str | None = None, sort_by: str = "best_val_loss") -> tuple:
    """The sort key of a row; repeated_status: the status of the run an identical job
    repeats, which ranks it as that run."""
    best = row[sort_by]
    finite = isinstance(best, (int, float)) and math.isfinite(best)
    status = repeated_status if row["status"] == "identical" else row["status"]
    ok = status == "completed" and finite
    return (not ok, SORTS[sort_by] * best if ok else 0.0, row["job"])


def write_csv(table: list[dict], path: Path) -> None:
    """summary.csv: COLUMNS, one row per job in the order given; the overrides as a shell
    would take them (`trainrun <overrides>` runs the job again); None is an empty cell."""
    text = io.StringIO(newline="")
    out = csv.DictWriter(text, fieldnames=COLUMNS)
    out.writeheader()
    for row in table:
        cells = {**row, "overrides": shlex.join(row["overrides"])}
        out.writerow({k: "" if cells[k] is None else cells[k] for k in COLUMNS})
    rundir.write(path, text.getvalue(), within=path.parent)  # by rename, never through a link


def failures(table: list[dict], csv_path: Path) -> str | None:
    """The line that says how many jobs failed (None if none did); jobs not run because
    they repeat another are not failures."""
    failed = sum(row["status"] == "failed" for row in table)
    if not failed:
        return None
    return f"{failed} of {len(table)} jobs failed; see {csv_path}"


def sweep_command(args: list[str], sweep_dir: Path) -> str:
    """The command that continues a whole sweep: the same one with resume=auto and its
    sweep directory; finished jobs are skipped, stopped ones resumed (docs/sweeps.md)."""
    kept = [a for a in args if a.split("=", 1)[0] not in ("resume", "hydra.sweep.dir")]
    return shlex.join(["trainrun", *kept, "resume=auto", f"hydra.sweep.dir={sweep_dir}"])


def common_overrides(table: list[dict]) -> list[str]:
    """The overrides every job of the sweep has (when there are two jobs or more)."""
    if len(table) < 2:
        return []
    first, *others = (row["overrides"] for row in table)
    return [o for o in first if all(o in other for other in others)]


def render(table: list[dict], sweep_dir: Path, sort_by: str = "best_val_loss"):
    """The rich Table of the summary: the overrides that tell jobs apart, run directories
    relative to the sweep directory; failed jobs' errors are printed below it. The val_bleu
    column is shown where a job measured BLEU (translation, trainer.bleu_every)."""
    from rich.table import Table

    common = set(common_overrides(table))
    bleu = any(row["val_bleu"] is not None for row in table)
    order = {"best_val_loss": "best val loss", "val_loss": "val loss", "val_bleu": "highest val BLEU"}
    out = Table(title=f"sweep {sweep_dir}: {len(table)} jobs, {order[sort_by]} first")
    for name, justify in (("job", "right"), ("overrides", "left"), ("status", "left"),
                          ("best_val_loss", "right"), ("val_loss", "right"),
                          *([("val_bleu", "right")] if bleu else []),
                          ("steps", "right"), ("skipped", "right"), ("wall s", "right"),
                          ("tok/s", "right"), ("params", "right"), ("run dir", "left")):
        out.add_column(name, justify=justify)
    for row in table:
        shown = shlex.join(o for o in row["overrides"] if o not in common)
        out.add_row(str(row["job"]), shown, row["status"], _number(row["best_val_loss"], ".4f"),
                    _number(row["val_loss"], ".4f"),
                    *([_number(row["val_bleu"], ".2f")] if bleu else []),
                    _number(row["steps"], "d"),
                    _number(row["skipped_updates"], "d"), _number(row["wall_seconds"], ".1f"),
                    _number(row["tokens_per_sec"], ",.0f"), _number(row["parameters"], ",d"),
                    _relative(row["run_dir"], sweep_dir))
    return out


def footer(table: list[dict], csv_path: Path) -> list[str]:
    """The lines printed under the table: common overrides, errors, where the CSV is."""
    lines = []
    common = common_overrides(table)
    if common:
        lines.append(f"every job: {shlex.join(common)}")
    lines += [f"job {row['job']}: {row['error']}" for row in table if row["error"]]
    lines.append(f"summary: {csv_path}")
    return lines


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _relative(run_dir: str, sweep_dir: Path) -> str:
    try:
        return str(Path(run_dir).resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return run_dir
