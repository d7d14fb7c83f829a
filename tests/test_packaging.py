"""A non-editable install: the Hydra configs ship inside the wheel, and `trainrun` runs from
an unrelated directory, in a virtual environment of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, tiny

SOURCES = ("pyproject.toml", "README.md", "trainrun", "conf")


@pytest.mark.slow
def test_wheel_ships_the_configs_and_runs_anywhere(tmp_path, corpus):
    # built from a copy of the sources: no stale build/ of the checkout gets into the wheel
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("trainrun-*.whl")
    with zipfile.ZipFile(wheel) as archive:  # every config, Hydra's launcher presets too
        shipped = {n for n in archive.namelist() if n.startswith("trainrun/conf/")}
    assert {f"trainrun/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")} <= shipped
    # A venv of its own that also sees the packages of the environment running the tests
    # (torch, hydra, ...), whichever that is: a .pth file in the new venv names them. Only
    # site directories process .pth files, so an editable install of this checkout there
    # stays invisible and `import trainrun` finds the wheel's copy.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin/python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "outer-env.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import trainrun; print(trainrun.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where  # the installed copy, not the checkout
    proc = subprocess.run([venv / "bin/trainrun", *tiny(corpus, "trainer.max_steps=3"),
                           "scheduler.warmup_ratio=null", "hydra.run.dir=run"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (elsewhere / "run/metrics.json").is_file()
