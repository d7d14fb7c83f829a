"""The command's first seconds: stop signals before the first update, --version, and
trainer.threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from helpers import cli, config, tiny, train

from trainrun import threads
from trainrun.errors import ConfigError


def trainrun_process(args: list[str], cwd: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("trainrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainrun"]
    return subprocess.Popen([*cmd, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# at 0.3 s trainrun is importing Hydra and torch; later, Hydra composes, the data is
# tokenized and the model built; the run takes a few seconds more, so none reaches training
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_before_the_first_update_ends_in_one_line(tmp_path, corpus, delay, sig):
    run_dir = tmp_path / "run"
    proc = trainrun_process(tiny(corpus, "trainer.max_steps=100000", "trainer.log_every=1",
                                 f"hydra.run.dir={run_dir}"), tmp_path)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    if "step 1/" in out:  # a slow start is rare: then it stops as a run does
        status = json.loads((run_dir / "metrics.json").read_text())["status"]
        assert status == "stopped"
        return
    assert err.strip() == f"trainrun: {signal.Signals(sig).name}: stopped before the first update"
    assert not run_dir.exists()  # nothing of the run was written


# a stop sent from inside a library's code, on purpose (TRAINRUN_SIGNAL_INSIDE): while Hydra
# is imported (the window 0.3 s after launch), and while `datasets` loads the data
@pytest.mark.parametrize("sig, where", [(signal.SIGINT, "hydra.core.hydra_config"),
                                        (signal.SIGTERM, "datasets.load.load_dataset")])
def test_a_stop_signal_inside_a_library_ends_in_one_line_once_its_call_returns(
        tmp_path, corpus, sig, where):
    run_dir = tmp_path / "run"
    proc = cli(*tiny(corpus, "trainer.max_steps=200", f"hydra.run.dir={run_dir}"), cwd=tmp_path,
               env={"TRAINRUN_SIGNAL_INSIDE": f"{sig.name}:{where}"})
    assert proc.returncode == 128 + sig, proc.stderr
    assert proc.stderr == f"trainrun: {sig.name}: stopped before the first update\n"
    assert not run_dir.exists() and "step 1/" not in proc.stdout
    if where.startswith("datasets"):  # the stop waited for datasets' call to return
        assert "data: " in proc.stdout


def test_a_signal_the_moment_hydra_makes_the_run_directory_leaves_none(tmp_path, corpus):
    """Hydra makes the run directory, then trainrun builds the run: a stop in between too
    leaves nothing behind (the directory is looked for every half millisecond)."""
    run_dir = tmp_path / "run"
    proc = trainrun_process(tiny(corpus, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"),
                            tmp_path)
    deadline = time.monotonic() + 60
    while not run_dir.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "trainrun: SIGINT: stopped before the first update\n" and "step 1/" not in out
    assert not run_dir.exists()


def test_a_signal_after_hydra_composed_but_before_it_names_the_directory():
    """Between composing the config and naming the job's directory, Hydra's output_dir is
    still missing ('???'): the start-up handler must still raise only StartupStop."""
    from hydra.core.hydra_config import HydraConfig

    from trainrun import signals
    from trainrun.composition import hydra_configs

    HydraConfig.instance().set_config(hydra_configs([[]], with_hydra=True)[0])
    try:
        with pytest.raises(signals.StartupStop):
            signals._during_startup(signal.SIGTERM, None)
        assert signals.startup_run_dir() is None
    finally:
        HydraConfig.instance().cfg = None
        signals._startup.update(received=None, run_dir=None)


def test_a_signal_during_start_up_leaves_a_resumed_run_as_it_was(tmp_path, finished_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    proc = trainrun_process([f"resume={run_dir}", "trainer.max_steps=100000"], tmp_path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_version_names_trainrun_torch_and_hydra(tmp_path):
    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    from trainrun import __version__

    line = proc.stdout.strip()
    assert line.startswith(f"trainrun {__version__} (")
    assert f"torch {torch.__version__}" in line
    assert f"hydra-core {metadata.version('hydra-core')}" in line


# -- trainer.threads -------------------------------------------------------------------

def test_threads_auto_takes_omp_num_threads_when_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose("auto")[0] == 3


def test_threads_auto_leaves_the_cores_other_jobs_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.choose("auto")[0] == 8
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    n, why = threads.choose("auto")
    assert n == 5 and "load average 3.2" in why
    monkeypatch.setattr(os, "getloadavg", lambda: (20.0, 0.0, 0.0))
    assert threads.choose("auto")[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes share the cores
    assert threads.choose("auto")[0] == 2


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "many", "nan", "1025", "100000"])
def test_threads_refuses_what_is_not_auto_or_a_count(value):
    with pytest.raises(ConfigError) as err:
        config(f"trainer.threads={value}")
    assert err.value.key == "trainer.threads"
    assert err.value.message.endswith("allowed: auto, or a whole number of threads from 1 to "
                                      "1024")


def test_threads_up_to_the_bound_are_allowed_and_more_than_the_cores_said(monkeypatch):
    assert config("trainer.threads=1024").trainer.threads == "1024"
    monkeypatch.setattr(threads, "cores", lambda: 8)
    assert threads.choose("8") == (8, "trainer.threads=8")
    n, why = threads.choose("64")
    assert n == 64 and "more than the 8 core(s) this process may run on" in why


def test_threads_far_past_the_cores_is_one_line_in_a_process(tmp_path):
    proc = cli("trainer.threads=100000", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr == (
        "trainrun: error: trainer.threads: got '100000'; allowed: auto, or a whole number of "
        "threads from 1 to 1024\n")
    assert list(tmp_path.iterdir()) == []


def test_a_run_uses_and_logs_the_threads_asked_for(tmp_path, corpus):
    before = torch.get_num_threads()
    try:
        train(tmp_path / "run", *tiny(corpus, "trainer.max_steps=2", "trainer.threads=2"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "2 CPU thread(s) (trainer.threads=2)" in log
