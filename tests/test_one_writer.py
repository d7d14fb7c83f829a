"""One process writes a run directory at a time, with real concurrent processes: a second
writer is refused in one line naming the first one's pid and changes nothing; a killed
writer's lock is free again; fresh runs started in the same second get their own
directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers import cli, tiny, wait_for

from trainrun import rundir

TRAINRUN = str(Path(sys.executable).with_name("trainrun"))


def one_line(proc: subprocess.CompletedProcess, key: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainrun: error: {key}: "), proc.stderr
    return lines[0]


def files(run: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def paused_in_a_save(args: list[str], run: Path, cwd: Path) -> subprocess.Popen:
    """A trainrun process that holds `run` and is paused half-way through a checkpoint."""
    proc = subprocess.Popen([TRAINRUN, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TRAINRUN_SAVE_PAUSE": "600"})
    wait_for(lambda: proc.poll() is not None
             or any((run / "checkpoints").glob(".tmp-*/meta.json")))
    assert proc.poll() is None, proc.stderr.read()
    return proc


@pytest.mark.slow
def test_a_second_resume_is_refused_while_the_first_writes(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    first = paused_in_a_save([f"resume={run}", "trainer.max_steps=42", "trainer.ckpt_every=1"],
                             run, tmp_path)
    try:
        during = files(run)
        second = cli(f"resume={run}", "trainer.max_steps=44", cwd=tmp_path)
        line = one_line(second, "resume")
        assert f"being written by another trainrun process (pid {first.pid})" in line
        assert files(run) == during  # nothing of the first one's save was touched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed process's lock is free again (the kernel drops it); its file is reused
    assert (run / rundir.LOCK).exists()
    again = cli(f"resume={run}", "trainer.max_steps=42", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in (run / "train.log").read_text()
    assert not (run / rundir.LOCK).exists()


@pytest.mark.slow
def test_a_second_fresh_run_into_the_same_directory_is_refused(corpus, tmp_path):
    run = tmp_path / "fixed"
    args = tiny(corpus, "trainer.max_steps=4", "trainer.ckpt_every=2", f"hydra.run.dir={run}")
    first = paused_in_a_save(args, run, tmp_path)
    try:
        during = files(run)
        second = cli(*args, cwd=tmp_path)
        assert f"(pid {first.pid})" in one_line(second, "hydra.run.dir")
        assert files(run) == during
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


@pytest.mark.slow
def test_fresh_runs_started_in_the_same_second_get_their_own_directories(corpus, tmp_path):
    # every second of the next two minutes is taken already, as by a run started in it: the
    # three runs started at once all meet a taken name and race for the next one
    now = datetime.now()
    for s in range(120):
        t = now + timedelta(seconds=s)
        (tmp_path / "outputs" / t.strftime("%Y-%m-%d") / t.strftime("%H-%M-%S")).mkdir(
            parents=True, exist_ok=True)
    procs = [subprocess.Popen([TRAINRUN, *tiny(corpus, "trainer.max_steps=2",
                                               "trainer.eval_every=2")],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    dirs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        dirs.append(out.strip().splitlines()[-1].rsplit("run directory ", 1)[1])
    assert len(set(dirs)) == 3
    for run in map(Path, dirs):
        assert run.name.rsplit("-", 1)[1] in ("1", "2", "3")  # <time>-1, -2, -3
        assert (run / "metrics.json").exists() and (run / ".hydra" / "config.yaml").exists()


def test_fresh_names_a_taken_second_with_a_suffix(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 4, 9, 30, 5)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    made = [rundir.fresh(Path("outputs"), claimed=False) for _ in range(3)]
    assert [str(p) for p in made] == ["outputs/2026-12-04/09-30-05", "outputs/2026-12-04/09-30-05-1",
                                      "outputs/2026-12-04/09-30-05-2"]


def test_a_claim_is_refused_to_another_process_and_its_file_removed_on_release(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    held = rundir.claim(run, "resume")
    probe = ("import sys; from pathlib import Path; from trainrun import rundir\n"
             "from trainrun.errors import ConfigError\n"
             "try:\n    rundir.claim(Path(sys.argv[1]), 'resume')\n"
             "except ConfigError as e:\n    print(e)")
    other = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True,
                           text=True, timeout=120)
    assert f"(pid {os.getpid()})" in other.stdout
    assert rundir.claim(run, "resume") is held  # this process's own claim, again
    held.release()
    assert list(run.iterdir()) == []
    free = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True,
                          text=True, timeout=120)
    assert free.stdout == "" and free.returncode == 0, free.stderr
    assert list(run.iterdir()) == []  # the other process released it when it ended
