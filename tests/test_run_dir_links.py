"""A run directory is data: a link (or a pipe) planted where trainrun reads or writes is
refused in one line, with real processes, and the file it points to is left as it was;
a resume never takes model.init_from from the run directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, tiny

from trainrun import rundir


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root (links as their target's name), with its content and mtime."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = (os.readlink(path).encode(), 0)
        elif path.is_file():
            found[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def one_line(proc: subprocess.CompletedProcess, prog: str, key: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {key}: "), proc.stderr
    return lines[0]


@pytest.fixture
def victims(tmp_path) -> Path:
    """Files and a folder outside the run that a planted link points at."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "victim.txt").write_text("# the user's own file\n")
    (outside / "folder" / "kept.txt").write_text("kept\n")
    return outside


def plant(run: Path, entry: str, outside: Path, other_run: Path) -> None:
    """Put a link (or a pipe) at `entry` of run, replacing what is there."""
    path = run / entry.removesuffix("#fifo")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if entry == "train.log#fifo":
        os.mkfifo(path)
    elif entry == "checkpoints":
        path.symlink_to(other_run / "checkpoints")
    elif entry in (".hydra", "tb"):
        path.symlink_to(outside / "folder")
    else:
        path.symlink_to(outside / "victim.txt")


# Every place trainrun writes, deletes or reads in a run directory
PLANTED = ["train.log", "env.json", "metrics.json", ".metrics.json.tmp", "tokenizer.json",
           ".tokenizer.json.tmp", "console.out", ".trainrun.lock", ".hydra", ".hydra/config.yaml",
           ".hydra/hydra.yaml", ".hydra/overrides.yaml", "tb", "checkpoints",
           "checkpoints/.latest.tmp", "checkpoints/latest",
           "checkpoints/step-00000040/model.safetensors", "train.log#fifo"]


@pytest.mark.slow
def test_every_planted_link_is_refused_and_its_target_unchanged(finished_run, tmp_path,
                                                                victims):
    other = tmp_path / "other"  # another run, whose checkpoints pruning must not delete
    shutil.copytree(finished_run, other, symlinks=True)
    runs = {}
    for i, entry in enumerate(PLANTED):
        run = tmp_path / f"run{i}"
        shutil.copytree(finished_run, run, symlinks=True)
        plant(run, entry, victims, other)
        runs[entry] = run
    before = {"outside": snapshot(victims), "other": snapshot(other),
              **{entry: snapshot(run) for entry, run in runs.items()}}
    # all at once: each is refused before it reads the data or builds anything
    procs = {entry: subprocess.Popen(
        [str(Path(sys.executable).with_name("trainrun")), f"resume={run}",
         "trainer.max_steps=44", "trainer.ckpt_every=1", "trainer.keep_last=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for entry, run in runs.items()}
    for entry, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        line = one_line(done, "trainrun", "resume")
        shown = entry.removesuffix("#fifo")
        assert f"{runs[entry] / shown} is " in line, line
        assert ("pipe" if entry.endswith("#fifo") else "symbolic link") in line
    assert snapshot(victims) == before["outside"]
    assert snapshot(other) == before["other"]
    for entry, run in runs.items():
        assert snapshot(run) == before[entry], entry


@pytest.mark.slow
def test_a_fresh_run_into_a_directory_with_a_link_is_refused(corpus, tmp_path, victims):
    run = tmp_path / "fixed"
    run.mkdir()
    (run / "train.log").symlink_to(victims / "victim.txt")
    before = snapshot(victims)
    for resume in ("null", "auto"):
        proc = cli(*tiny(corpus, "trainer.max_steps=2", f"hydra.run.dir={run}",
                         f"resume={resume}"), cwd=tmp_path)
        assert f"{run / 'train.log'} is a symbolic link" in one_line(proc, "trainrun",
                                                                      "hydra.run.dir")
    assert snapshot(victims) == before
    assert sorted(p.name for p in run.iterdir()) == ["train.log"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["trainrun-eval", "trainrun-sample", "trainrun-export",
                                     "trainrun-average"])
def test_the_commands_after_training_follow_no_link(finished_run, tmp_path, victims, command):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    plant(run, "checkpoints/latest", victims, run)
    args = {"trainrun-sample": ["--max-new-tokens", "2"],
            "trainrun-export": [str(tmp_path / "export")],
            "trainrun-average": ["--last", "1"]}.get(command, [])
    proc = subprocess.run([str(Path(sys.executable).with_name(command)), str(run), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "checkpoints/latest is a symbolic link" in one_line(proc, command, "RUN_DIR")
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_the_launcher_refuses_a_linked_console_out_before_it_starts(finished_run, tmp_path,
                                                                    victims):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    plant(run, "console.out", victims, run)
    before = snapshot(victims)
    proc = subprocess.run([str(Path(sys.executable).with_name("trainrun-nohup")),
                           f"resume={run}", "trainer.max_steps=44"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "console.out is a symbolic link" in one_line(proc, "trainrun-nohup", "resume")
    assert proc.stdout == ""  # no pid: nothing was started
    assert snapshot(victims) == before


@pytest.mark.slow
def test_a_resume_takes_no_init_from_from_the_run_directory(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    marker = tmp_path / "ran"
    saved = run / ".hydra" / "overrides.yaml"
    saved.write_text(saved.read_text() + f"- model.init_from='$(touch {marker})'\n")
    proc = cli(f"resume={run}", "trainer.max_steps=42", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "init_from: null" in (run / ".hydra" / "config.yaml").read_text()
    assert "init_from" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert "$(" not in (run / "train.log").read_text()
    assert not marker.exists()


def test_writes_follow_no_link_made_after_the_check(tmp_path, victims):
    """The second line of defence: a link made while a run runs is not followed either."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").symlink_to(victims / "folder")
    (run / "train.log").symlink_to(victims / "victim.txt")
    (run / "checkpoints").mkdir()
    os.mkfifo(run / "checkpoints" / "pipe")
    before = snapshot(victims)
    with pytest.raises(OSError):
        rundir.write(run / ".hydra" / "config.yaml", "x", within=run)
    with pytest.raises(OSError):
        rundir.folder(run / ".hydra" / "deeper", within=run)
    with pytest.raises(OSError):
        rundir.append(run / "train.log", within=run)
    with pytest.raises(OSError):  # a pipe would block a plain open() for ever
        rundir.append(run / "checkpoints" / "pipe", within=run)
    rundir.write(run / "train.log", "replaced", within=run)  # the link itself is replaced
    assert not (run / "train.log").is_symlink() and (run / "train.log").read_text() == "replaced"
    assert snapshot(victims) == before


def test_an_appended_file_with_a_second_hard_link_is_refused(tmp_path, victims):
    run = tmp_path / "run"
    run.mkdir()
    os.link(victims / "victim.txt", run / "train.log")
    found = rundir.unsafe(run)
    assert found is not None and found[0] == run / "train.log" and "hard link" in found[1]
    with pytest.raises(OSError):
        rundir.append(run / "train.log", within=run)


@pytest.mark.slow
def test_a_sweep_job_whose_folder_is_a_link_is_refused(corpus, tmp_path, victims):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "0").symlink_to(victims / "folder")  # planted in a sweep directory to continue
    before = snapshot(victims)
    proc = cli("-m", *tiny(corpus, "trainer.max_steps=2", "trainer.eval_every=2"),
               "optimizer.lr=1e-3,2e-3", "resume=auto", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # one job failed, the other ran
    assert f"error: hydra.sweep.dir: {sweep / '0'} is a symbolic link" in proc.stderr
    assert (sweep / "1" / "metrics.json").exists()
    assert snapshot(victims) == before
