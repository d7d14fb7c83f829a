"""A sweep's jobs: identical ones run once, with a note before the sweep starts; a signal
says how to continue the whole sweep, and that command does."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

from helpers import cli, scalars, tiny, wait_for


def rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_jobs_made_identical_by_an_ignored_key_run_once(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    proc = cli("-m", *tiny(corpus, "trainer.max_steps=3"), "scheduler=noam,cosine",
               "optimizer.lr=0.001,0.002", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # a job not run is not a failed one
    assert "failed" not in proc.stderr
    # jobs: 0 noam 0.001, 1 noam 0.002, 2 cosine 0.001, 3 cosine 0.002: noam sets its own rate
    note = ("trainrun: job 1 is identical to job 0 (optimizer.lr=0.002: not used by the options "
            "chosen); it is not run again")
    assert proc.stderr.splitlines()[0] == note  # said before any job starts
    table = sorted(rows(sweep_dir), key=lambda r: int(r["job"]))  # the table ranks by loss
    assert [r["status"] for r in table] == ["completed", "identical", "completed", "completed"]
    assert table[1]["error"] == "not run: identical to job 0 (optimizer.lr=0.002: not used by " \
                                "the options chosen)"
    assert not (sweep_dir / "1").exists()
    # the repeat's row has the results of the job it repeats, and points to its directory
    assert table[1]["same_as"] == "0" and table[1]["run_dir"] == str(sweep_dir / "0")
    for key in ("best_val_loss", "val_loss", "steps", "tokens_per_sec"):
        assert table[1][key] == table[0][key] != ""
    assert [r["same_as"] for r in table] == ["", "0", "", ""]
    assert table[2]["best_val_loss"] != table[3]["best_val_loss"]  # cosine does use it
    # ranked beside the run it repeats: best first, the repeat right after its twin
    ranked = [int(r["job"]) for r in rows(sweep_dir)]
    assert ranked.index(1) == ranked.index(0) + 1


def test_a_sweep_over_schedules_runs_every_schedule(tmp_path, corpus):
    """cosine and linear have the same keys and values, not the same curve: three jobs run."""
    sweep_dir = tmp_path / "sweep"
    proc = cli("-m", *tiny(corpus, "trainer.max_steps=8", "trainer.eval_every=8"),
               "scheduler=cosine,linear,constant", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "identical" not in proc.stderr
    table = sorted(rows(sweep_dir), key=lambda r: int(r["job"]))
    assert [(r["overrides"].split()[-1], r["status"]) for r in table] == [
        ("scheduler=cosine", "completed"), ("scheduler=linear", "completed"),
        ("scheduler=constant", "completed")]
    curves = [scalars(sweep_dir / str(job), "train/lr") for job in range(3)]
    assert all([k for k, _ in curve] == list(range(1, 9)) for curve in curves)
    assert len({tuple(curve) for curve in curves}) == 3


def test_a_signal_says_how_to_continue_the_whole_sweep_and_that_command_does(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *tiny(corpus, "trainer.max_steps=300", "trainer.log_every=1"),
            "optimizer.lr=0.001,0.002", f"hydra.sweep.dir={sweep_dir}"]
    exe = Path(sys.executable).with_name("trainrun")
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = sweep_dir / "0" / "train.log"
    wait_for(lambda: log.exists() and "step 5/" in log.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = err.splitlines()
    hint = lines[lines.index("trainrun: the sweep stopped at job 0; to continue all of it "
                             "(finished jobs are skipped, stopped ones resumed):") + 1]
    assert hint.startswith("trainrun -m ") and hint.endswith(
        f"resume=auto hydra.sweep.dir={sweep_dir}")
    again = subprocess.run(hint.replace("trainrun", str(exe), 1), shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for job in ("0", "1"):
        m = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert m["status"] == "completed" and m["steps"] == 300
    assert "resumed from" in (sweep_dir / "0" / "train.log").read_text()
    # the resumed job goes on in the same TensorBoard run, named by its swept override
    assert [p.name for p in (sweep_dir / "0" / "tb").iterdir()] == ["optimizer.lr=0.001"]
    assert [k for k, _ in scalars(sweep_dir / "0", "train/lr")] == list(range(1, 301))
    # once more: every job is complete, nothing runs or changes
    before = (sweep_dir / "0" / "metrics.json").read_text()
    third = subprocess.run(hint.replace("trainrun", str(exe), 1), shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stderr.count("already complete at update 300") == 2
    assert (sweep_dir / "0" / "metrics.json").read_text() == before


def test_tensorboard_names_a_job_by_the_overrides_it_sweeps(monkeypatch):
    from trainrun import sweep

    monkeypatch.delenv(sweep.SWEPT, raising=False)
    sweep.announce_swept({"optimizer.lr", "data.files"})
    job = ["trainer.max_steps=3", "data.files=/a/b.txt", "optimizer.lr=0.001"]
    assert sweep.tb_name(job, []) == "data.files=_a_b.txt,optimizer.lr=0.001"
    # another sweeper's searched keys; and every override when none is known
    assert sweep.tb_name(["trainer.max_steps=3", "+x=1"], ["x"]) == "+x=1"
    monkeypatch.delenv(sweep.SWEPT)
    assert sweep.tb_name(["a=1", "b=2"], []) == "a=1,b=2"
    assert sweep.tb_name([], []) == "defaults"
    long = sweep.tb_name([f"k{i}=" + "v" * 20 for i in range(10)], [])
    assert len(long) == 119 and "/" not in long
    assert long != sweep.tb_name([f"k{i}=" + "v" * 20 for i in range(11)], [])
