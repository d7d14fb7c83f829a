"""Sweeps (`trainrun -m`): real Hydra multiruns in subprocesses, each row of summary.csv
checked against what the job itself wrote (.hydra/overrides.yaml, metrics.json)."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import TINY, cli, tiny

HEADER = ["job", "overrides", "status", "best_val_loss", "val_loss", "val_bleu", "steps",
          "skipped_updates", "wall_seconds", "tokens_per_sec", "parameters", "run_dir", "same_as",
          "error"]
METRICS = ["status", "best_val_loss", "val_loss", "val_bleu", "steps", "skipped_updates",
           "wall_seconds", "tokens_per_sec", "parameters"]
SHORT = ("trainer.max_steps=10", "trainer.eval_every=5")


def summary(sweep: Path) -> list[dict]:
    with (sweep / "summary.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == HEADER
        return list(reader)


def job_overrides(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text())


def check_against_jobs(sweep: Path, rows: list[dict]) -> None:
    """Each row says what its job wrote: its overrides, directory and metrics.json."""
    for row in rows:
        run_dir = Path(row["run_dir"])
        assert run_dir == sweep / row["job"]
        assert shlex.split(row["overrides"]) == job_overrides(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for key in METRICS:
            cell = row[key]
            if metrics[key] is None:
                assert cell == "", key
            elif isinstance(metrics[key], str):
                assert cell == metrics[key], key
            else:
                assert float(cell) == metrics[key], key


def assert_best_first(rows: list[dict]) -> None:
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)


@pytest.mark.parametrize("launcher", [
    [],
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
], ids=["basic", "joblib"])
def test_a_2x2_sweep_writes_a_row_per_job(tmp_path, corpus, launcher):
    if launcher:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = cli("-m", *tiny(corpus, *SHORT), "optimizer.lr=1e-3,3e-3", "scheduler=cosine,constant",
               *launcher, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed" not in proc.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0] != ".") == \
        ["0", "1", "2", "3"]
    rows = summary(sweep)
    assert len(rows) == 4
    check_against_jobs(sweep, rows)
    assert {r["status"] for r in rows} == {"completed"} and {r["error"] for r in rows} == {""}
    assert {int(r["steps"]) for r in rows} == {10}
    swept = {tuple(o for o in shlex.split(r["overrides"])
                   if o.startswith(("optimizer.lr=", "scheduler="))) for r in rows}
    assert swept == {(f"optimizer.lr={lr}", f"scheduler={s}")
                     for lr in ("0.001", "0.003") for s in ("cosine", "constant")}
    assert_best_first(rows)
    for row in rows:  # TensorBoard names each job's run by the overrides it sweeps
        named = [o for o in shlex.split(row["overrides"])
                 if o.startswith(("optimizer.lr=", "scheduler="))]
        (run,) = (Path(row["run_dir"]) / "tb").iterdir()
        assert run.name == ",".join(named) and list(run.glob("events.out.tfevents.*"))
    # the table on stdout: one line per job, best first, with its loss to 4 decimals
    lines = proc.stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if f"sweep {sweep}: 4 jobs" in line)
    shown = [line for line in lines[title:] if " completed " in line]  # box drawing or ASCII
    assert [re.search(r"\d+", line).group() for line in shown] == [r["job"] for r in rows]
    for line, row in zip(shown, rows, strict=True):
        assert f"{float(row['best_val_loss']):.4f}" in line
    assert f"summary: {sweep / 'summary.csv'}" in proc.stdout


def test_failed_jobs_get_their_row_and_the_sweep_goes_on(tmp_path, corpus):
    """Job by job: a crash (its env.json cannot be written: a directory is in the way),
    a run that completes, one that diverges past trainer.max_skipped, and three whose data
    file is not text, which only reading it shows (the sweep's check before the first job
    passes them)."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 20)
    sweep = tmp_path / "sweep"
    (sweep / "0/env.json").mkdir(parents=True)
    proc = cli("-m", *TINY, *SHORT, "scheduler=constant", "trainer.max_skipped=2", "data=text",
               f"data.files={corpus},{binary}", "optimizer.lr=1e-3,3e-3,1e30",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == \
        f"trainrun: 5 of 6 jobs failed; see {sweep / 'summary.csv'}"
    rows = summary(sweep)
    assert [r["job"] for r in rows] == ["1", "0", "2", "3", "4", "5"]  # completed, then failed
    by_job = {int(r["job"]): r for r in rows}
    for job, row in by_job.items():
        assert shlex.split(row["overrides"])[-2:] == [
            f"data.files={corpus if job < 3 else binary}",
            f"optimizer.lr={('0.001', '0.003', '1e+30')[job % 3]}"]
    assert by_job[1]["status"] == "completed" and by_job[1]["error"] == ""
    check_against_jobs(sweep, [by_job[1], by_job[2]])
    assert [r["status"] for r in rows[1:]] == ["failed"] * 5
    # each error is the line that job printed on stderr, after "trainrun: "
    stderr = proc.stderr.splitlines()
    for row in rows[1:]:
        assert any(line.startswith(f"trainrun: {row['error']}") for line in stderr), row
    assert by_job[0]["error"].startswith("failed: IsADirectoryError: ")
    assert "Traceback" in proc.stderr
    log = (sweep / "0/train.log").read_text()
    assert "Traceback" in log and "IsADirectoryError" in log
    assert by_job[2]["error"].startswith("failed: the weights became non-finite at update 1")
    assert json.loads((sweep / "2/metrics.json").read_text())["status"] == "failed"
    for job in (3, 4, 5):
        assert by_job[job]["error"].startswith("error: data.files: ")
        assert "UTF-8" in by_job[job]["error"]
        assert not (sweep / str(job)).exists()  # a run refused while built writes nothing
        assert by_job[job]["steps"] == ""


@pytest.mark.parametrize("launcher", [
    [],
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
], ids=["basic", "joblib"])
def test_a_sweep_in_which_a_job_failed_exits_1_and_says_how_many(tmp_path, corpus, launcher):
    """One job of two fails (its data file is not text, which only reading it shows): the
    other still runs, and the sweep exits 1 with the count."""
    if launcher:
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 20)
    sweep = tmp_path / "sweep"
    proc = cli("-m", *TINY, "trainer.max_steps=2", "data=text", f"data.files={corpus},{binary}",
               *launcher, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == \
        f"trainrun: 1 of 2 jobs failed; see {sweep / 'summary.csv'}"
    assert "Traceback" not in proc.stderr
    statuses = {r["job"]: r["status"] for r in summary(sweep)}
    assert statuses == {"0": "completed", "1": "failed"}


def test_an_optuna_search_of_4_trials(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=4",
               *tiny(corpus, *SHORT), f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = summary(sweep)
    assert len(rows) == 4 and {r["job"] for r in rows} == {"0", "1", "2", "3"}
    check_against_jobs(sweep, rows)
    assert_best_first(rows)
    for row in rows:  # each trial's values lie in the search space and reached its config
        values = dict(o.split("=", 1) for o in shlex.split(row["overrides"]))
        config = yaml.safe_load((Path(row["run_dir"]) / ".hydra/config.yaml").read_text())
        assert 1e-4 <= float(values["optimizer.lr"]) <= 3e-2
        assert 0.0 <= float(values["scheduler.warmup_ratio"]) <= 0.2
        assert 0.1 <= float(values["clip.max_norm"]) <= 10.0
        assert values["scheduler"] in ("cosine", "linear", "wsd", "constant")
        assert config["optimizer"]["lr"] == float(values["optimizer.lr"])
        assert config["clip"]["max_norm"] == float(values["clip.max_norm"])
        assert config["scheduler"]["warmup_ratio"] == float(values["scheduler.warmup_ratio"])
    # Optuna minimized what each job returned: its best_val_loss
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == float(rows[0]["best_val_loss"])
    # a trial is a run like any other: it resumes (the search that chose it stays behind)
    best = Path(rows[0]["run_dir"])
    more = cli(f"resume={best}", "trainer.max_steps=12", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert json.loads((best / "metrics.json").read_text())["steps"] == 12


def test_launcher_presets(tmp_path):
    """conf/hydra/launcher/: parallel (joblib), submitit (on this machine), slurm (one task
    per GPU: tasks_per_node follows gpus_per_node)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from trainrun.composition import hydra_configs

    def launcher(*overrides):
        return hydra_configs([list(overrides)], with_hydra=True)[0].hydra.launcher

    parallel = launcher("hydra/launcher=parallel", "hydra.launcher.n_jobs=3")
    assert parallel._target_.endswith("JoblibLauncher") and parallel.n_jobs == 3
    local = launcher("hydra/launcher=submitit")
    assert local._target_.endswith("LocalLauncher") and local.timeout_min == 1440
    slurm = launcher("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8",
                     "hydra.launcher.partition=gpu")
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.gpus_per_node, slurm.tasks_per_node, slurm.partition) == (8, 8, "gpu")


@pytest.mark.parametrize("args, message", [
    (["hydra/launcher=jobli"], "trainrun: error: hydra/launcher: unknown option 'jobli'; allowed: basic"),
    (["hydra/launcher=basic", "hydra.launcher.n_jobs=2"], "trainrun: error: hydra.launcher.n_jobs: unknown key"),
    (["hparams_search=optun"], "trainrun: error: hparams_search: unknown option 'optun'; allowed: optuna"),
])
def test_a_bad_launcher_or_search_fails_before_any_job(tmp_path, args, message):
    proc = cli("-m", "optimizer.lr=1e-3,3e-3", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_only_rank_0_records_a_job(monkeypatch):
    """The tasks of an srun step (submitit's SLURM jobs with several GPUs) and torchrun's
    workers run the same job: rank 0 alone reports it."""
    from trainrun.composition.summary import main_process

    for name in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert main_process()
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert not main_process()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("RANK", "1")
    assert not main_process()


def test_rows_rank_completed_runs_by_best_val_loss_then_the_rest(tmp_path):
    """Runs without a finite best_val_loss (failed, or never validated) come last, by job."""
    from trainrun import sweep

    outcomes = {0: ("completed", 2.5), 1: ("failed", 1.0), 2: ("completed", 1.5),
                3: ("completed", None), 4: ("completed", 3.0)}
    for job, (status, best) in outcomes.items():
        run_dir = tmp_path / str(job)
        run_dir.mkdir()
        (run_dir / "metrics.json").write_text(json.dumps({"status": status, "best_val_loss": best}))
        sweep.record(tmp_path, job, [f"optimizer.lr={job}"], run_dir,
                     "failed: boom" if status == "failed" else None)
    sweep.record(tmp_path, 5, ["optimizer.lr=5"], tmp_path / "5", None)  # never wrote metrics
    rows = sweep.rows(tmp_path)
    assert [r["job"] for r in rows] == [2, 0, 4, 1, 3, 5]
    assert rows[-1]["status"] == "failed" and "metrics.json" in rows[-1]["error"]
