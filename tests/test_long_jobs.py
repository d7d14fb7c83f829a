"""Long jobs over SSH: the trainrun-nohup and trainrun-tmux launchers, and SIGHUP on a
terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny, wait_for

TRAINRUN = f"{sys.executable} -m trainrun"


def completed(run_dir: Path) -> bool:
    m = run_dir / "metrics.json"
    return m.exists() and json.loads(m.read_text())["status"] == "completed"


def launcher(name: str) -> list[str]:
    """The console script installed with the package."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-c",
                                            f"from trainrun.commands.launch import {name[9:]}; {name[9:]}()"]


def launch(name: str, args: list[str], cwd: Path, **env) -> dict[str, str]:
    out = subprocess.run([*launcher(name), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TRAINRUN": TRAINRUN, **env})
    assert out.returncode == 0, out.stderr
    return dict(re.match(r"^([a-z ]+):\s+(.*)$", line).groups() for line in out.stdout.splitlines())


def exited(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_nohup_launcher(tmp_path, corpus):
    run_dir = tmp_path / "run"
    shown = launch("trainrun-nohup", [*tiny(corpus, "trainer.max_steps=6"),
                                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert shown["run directory"] == str(run_dir)
    assert shown["follow"] == f"tail -f {run_dir}/train.log"
    assert shown["resume"] == f"trainrun resume={run_dir}"
    wait_for(lambda: completed(run_dir))
    wait_for(lambda: exited(int(shown["pid"])))
    assert "step 6/6" in (run_dir / "console.out").read_text()


def test_nohup_launcher_fixes_the_run_directory_when_none_is_given(tmp_path, corpus):
    shown = launch("trainrun-nohup", tiny(corpus, "trainer.max_steps=3"), tmp_path)
    run_dir = tmp_path / shown["run directory"]
    assert shown["run directory"].startswith("outputs/")
    wait_for(lambda: completed(run_dir))
    assert list((tmp_path / "outputs").rglob("console.out")) == [run_dir / "console.out"]


@pytest.mark.parametrize("how", ["dir", "auto"])
def test_nohup_launcher_follows_a_resumed_run(tmp_path, corpus, finished_run, how):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "console.out").write_text("earlier output\n")
    args = ([f"resume={run_dir}", "trainer.max_steps=44"] if how == "dir" else
            [*tiny(corpus, "trainer.max_steps=44", "trainer.ckpt_every=20",
                   "trainer.eval_every=20"), "resume=auto", f"hydra.run.dir={run_dir}"])
    shown = launch("trainrun-nohup", args, tmp_path)
    assert shown["run directory"] == str(run_dir)
    assert shown["follow"] == f"tail -f {run_dir}/train.log"
    assert shown["resume"] == f"trainrun resume={run_dir}"
    wait_for(lambda: exited(int(shown["pid"])))
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 44
    console = (run_dir / "console.out").read_text()
    assert console.startswith("earlier output\n") and "resumed from" in console
    assert not (tmp_path / "outputs").exists()  # no stray directory


def test_nohup_launcher_of_a_sweep_prints_how_to_resume_the_sweep(tmp_path, corpus):
    shown = launch("trainrun-nohup", ["-m", *tiny(corpus, "trainer.max_steps=2"),
                                      "optimizer.lr=0.001,0.002"], tmp_path)
    sweep_dir = tmp_path / shown["run directory"]
    assert shown["resume"].endswith(f"resume=auto hydra.sweep.dir={shown['run directory']}")
    assert shown["resume"].startswith("trainrun -m ")
    wait_for(lambda: exited(int(shown["pid"])))
    assert (sweep_dir / "console.out").exists() and (sweep_dir / "summary.csv").exists()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_launcher(tmp_path, corpus):
    run_dir, session = tmp_path / "run", f"trainrun-test-{os.getpid()}"
    shown = launch("trainrun-tmux", [*tiny(corpus, "trainer.max_steps=6"),
                                     f"hydra.run.dir={run_dir}"], tmp_path,
                   TRAINRUN_SESSION=session)
    try:
        assert shown["tmux session"] == session
        assert shown["attach"].startswith(f"tmux attach -t {session} ")
        assert shown["resume"] == f"trainrun resume={run_dir}"
        wait_for(lambda: completed(run_dir))
        wait_for(lambda: "done:" in (run_dir / "console.out").read_text(), timeout=30)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_sighup_keeps_training_and_logging(tmp_path, corpus):
    """The terminal goes away (SIGHUP): the run finishes, train.log has every record."""
    run_dir = tmp_path / "run"
    main, child = pty.openpty()
    # a checkpoint every 5 updates, each held for half a second: the 60 updates outlast the
    # signal sent after update 5 by 5 s at least, however fast they are and however slowly
    # this test polls
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainrun",
         *tiny(corpus, "trainer.max_steps=60", "trainer.log_every=5", "trainer.ckpt_every=5"),
         f"hydra.run.dir={run_dir}"],
        stdin=child, stdout=child, stderr=child, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "120", "TRAINRUN_SAVE_PAUSE": "0.5"},
        # a terminal's session: SIGHUP acted on, even where this test runs under nohup
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    os.close(child)
    log = run_dir / "train.log"
    wait_for(lambda: log.exists() and "step 5/60" in log.read_text())
    proc.send_signal(signal.SIGHUP)
    os.close(main)  # the terminal is gone: writing to it would fail
    assert proc.wait(timeout=180) == 0
    text = log.read_text()
    assert "SIGHUP" in text and completed(run_dir)
    assert text.index("SIGHUP") < text.index("step 60/60")  # training went on after it


@pytest.mark.parametrize("name", ["trainrun-nohup", "trainrun-tmux"])
def test_a_launcher_refuses_bad_arguments_in_the_foreground_and_starts_nothing(tmp_path, name):
    out = subprocess.run([*launcher(name), "optimizer=adamx"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRAINRUN": TRAINRUN})
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    line, = out.stderr.strip().splitlines()
    assert line.startswith(f"{name}: error: optimizer: unknown option 'adamx'; allowed: "), line
    assert list(tmp_path.iterdir()) == []  # no run directory, no console.out, no process


@pytest.mark.parametrize("name", ["trainrun-nohup", "trainrun-tmux"])
def test_a_launcher_help_starts_nothing(tmp_path, name):
    out = subprocess.run([*launcher(name), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "TRAINRUN": TRAINRUN})
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {name} "), out.stderr
    assert list(tmp_path.iterdir()) == []
