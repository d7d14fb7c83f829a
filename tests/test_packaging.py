"""A non-editable install: the Hydra configs ship inside the wheel, and `trainrun` runs from
an unrelated directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, tiny


@pytest.mark.slow
def test_wheel_ships_the_configs_and_runs_anywhere(tmp_path, corpus):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(REPO)], check=True, capture_output=True)
    (wheel,) = wheels.glob("trainrun-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([venv / "bin/python", "-c", "import trainrun; print(trainrun.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where  # the installed copy, not the checkout
    proc = subprocess.run([venv / "bin/trainrun", *tiny(corpus, "trainer.max_steps=3"),
                           "scheduler.warmup_ratio=null", "hydra.run.dir=run"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "run/metrics.json").is_file()
