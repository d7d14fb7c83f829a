"""Long jobs over SSH: the nohup and tmux launchers, and SIGHUP on a terminal."""

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
from conftest import REPO, tiny, wait_for

TRAINRUN = f"{sys.executable} -m trainrun"


def completed(run_dir: Path) -> bool:
    m = run_dir / "metrics.json"
    return m.exists() and json.loads(m.read_text())["status"] == "completed"


def test_nohup_launcher(tmp_path, corpus):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [str(REPO / "scripts/run-nohup.sh"), *tiny(corpus, "trainer.max_steps=6"),
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "TRAINRUN": TRAINRUN},
    ).stdout
    pid = int(re.search(r"^pid:\s+(\d+)$", out, re.M).group(1))
    assert f"run directory: {run_dir}" in out
    assert f"tail -f {run_dir}/train.log" in out and f"trainrun resume={run_dir}" in out
    wait_for(lambda: completed(run_dir))
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")
    assert "step 6/6" in (run_dir / "console.out").read_text()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_launcher(tmp_path, corpus):
    run_dir, session = tmp_path / "run", f"trainrun-test-{os.getpid()}"
    out = subprocess.run(
        [str(REPO / "scripts/run-tmux.sh"), *tiny(corpus, "trainer.max_steps=6"),
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "TRAINRUN": TRAINRUN, "TRAINRUN_SESSION": session},
    ).stdout
    try:
        assert f"tmux session:  {session}" in out and f"tmux attach -t {session}" in out
        assert f"trainrun resume={run_dir}" in out
        wait_for(lambda: completed(run_dir))
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_sighup_keeps_training_and_logging(tmp_path, corpus):
    """The terminal goes away (SIGHUP): the run finishes, train.log has every record."""
    run_dir = tmp_path / "run"
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainrun",
         *tiny(corpus, "trainer.max_steps=60", "trainer.log_every=5"), f"hydra.run.dir={run_dir}"],
        stdin=child, stdout=child, stderr=child, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(child)
    log = run_dir / "train.log"
    wait_for(lambda: log.exists() and "step 5/60" in log.read_text())
    proc.send_signal(signal.SIGHUP)
    os.close(main)  # the terminal is gone: writing to it would fail
    assert proc.wait(timeout=180) == 0
    text = log.read_text()
    assert "SIGHUP" in text and "step 60/60" in text and completed(run_dir)
