"""What a run directory is trusted with, with real processes: a used directory is never
trained into afresh, a refused start or resume changes no file, a tampered directory runs
no code, and paths with any characters can be resumed with the command trainrun prints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, tiny, wait_for

from trainrun.resume import quote


def files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess, key: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainrun: error: {key}"), proc.stderr
    return lines[0]


def short_run(corpus, run: Path, cwd: Path, *extra: str) -> None:
    proc = cli(*tiny(corpus, "trainer.max_steps=4", "trainer.ckpt_every=2",
                     "trainer.eval_every=2", f"hydra.run.dir={quote(str(run))}", *extra), cwd=cwd)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_fresh_run_into_a_used_directory_is_refused_and_changes_nothing(corpus, tmp_path):
    run = tmp_path / "same"
    short_run(corpus, run, tmp_path)
    before = files(run)
    again = cli(*tiny(corpus, "trainer.max_steps=2", "trainer.seed=9", f"hydra.run.dir={run}"),
                cwd=tmp_path)
    line = one_error_line(again, "hydra.run.dir:")
    assert str(run) in line and f"trainrun resume={run}" in line and "checkpoints" in line
    assert files(run) == before


def test_a_save_replaces_a_directory_of_the_same_name(tmp_path):
    import torch

    from trainrun import checkpoint

    model = torch.nn.Linear(2, 2)
    stale = tmp_path / checkpoint.step_name(10)
    stale.mkdir(parents=True)
    (stale / checkpoint.MODEL_FILE).write_bytes(b"another run's weights")
    checkpoint.save(tmp_path, 10, model, {"k": 10}, {}, keep_last=3)
    assert checkpoint.verify(stale) is None
    fresh = torch.nn.Linear(2, 2)
    checkpoint.load(stale, fresh)
    assert torch.equal(fresh.weight, model.weight)
    assert not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"caf\xe9 cr\xe8me\n" * 50, bytes(range(256)) * 8],
                         ids=["latin1", "binary"])
def test_a_data_error_leaves_no_run_directory(tmp_path, content):
    bad = tmp_path / "data.txt"
    bad.write_bytes(content)
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = cli(*tiny(bad), cwd=cwd)  # Hydra's own outputs/<date>/<time>/
    one_error_line(proc, "data.files:")
    assert list(cwd.iterdir()) == []


# -- where Hydra makes the run directory ------------------------------------------------

# the folders there before trainrun starts -> the folders there after a refused start
EXISTED = {"none": ([], ["work"]),
           "a-parent": (["elsewhere"], ["elsewhere", "work"]),
           "the-run-directory": (["elsewhere/deep/run"],
                                 ["elsewhere", "elsewhere/deep", "elsewhere/deep/run", "work"])}


@pytest.mark.parametrize("existed, left", EXISTED.values(), ids=EXISTED.keys())
def test_a_refused_start_removes_only_what_hydra_made_for_it(tmp_path, existed, left):
    """A run directory outside the working directory, refused once built (its data is not
    text): the folders Hydra made for it go, one that existed before trainrun started stays."""
    bad = tmp_path / "data.txt"
    bad.write_bytes(bytes(range(128, 256)) * 8)
    cwd = tmp_path / "work"
    cwd.mkdir()
    for folder in existed:
        (tmp_path / folder).mkdir(parents=True)
    proc = cli(*tiny(bad), f"hydra.run.dir={tmp_path / 'elsewhere/deep/run'}", cwd=cwd)
    one_error_line(proc, "data.files:")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir()) == left


@pytest.mark.parametrize("key, flags", [("hydra.run.dir", []), ("hydra.sweep.dir", ["-m"])])
def test_a_run_directory_hydra_cannot_make_is_one_line(tmp_path, corpus, key, flags):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    proc = cli(*flags, *tiny(corpus), f"{key}={blocker / 'run'}", cwd=tmp_path)
    line = one_error_line(proc, f"{key}: ")
    assert f"{blocker} is not a folder" in line
    assert blocker.read_text() == "not a folder\n" and sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
def test_a_run_directory_in_a_folder_without_permission_is_one_line(tmp_path, corpus):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = cli(*tiny(corpus), f"hydra.run.dir={locked / 'run'}", cwd=tmp_path)
    assert "permission denied" in one_error_line(proc, "hydra.run.dir: ")
    assert list(locked.iterdir()) == []


# -- resume: a run directory is data, never code -----------------------------------------

@pytest.fixture
def made(corpus, tmp_path):
    """A finished 4-update run in runs/sec, and a victim file beside it."""
    run = tmp_path / "runs/sec"
    short_run(corpus, run, tmp_path)
    (tmp_path / "victim.txt").write_text("precious\n")
    return run


ATTACKS = {
    "callback": ["+hydra.callbacks.x._target_=builtins.open",
                 "+hydra.callbacks.x._args_=['victim.txt','w']"],
    "resolver": ["data.files=${oc.env:HOME}"],
    "not-a-string": [5],
}


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_tampered_overrides_file_is_refused_and_runs_nothing(made, tmp_path, attack):
    import yaml

    overrides = made / ".hydra/overrides.yaml"
    overrides.write_text(yaml.safe_dump(yaml.safe_load(overrides.read_text()) + ATTACKS[attack]))
    before = files(made)
    proc = cli(f"resume={made}", "trainer.max_steps=6", cwd=tmp_path)
    line = one_error_line(proc, "resume:")
    assert str(overrides) in line and repr(ATTACKS[attack][0]) in line
    assert files(made) == before
    assert (tmp_path / "victim.txt").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "victim.txt"]


@pytest.mark.slow
def test_a_tampered_meta_json_is_one_line(made, tmp_path):
    meta = sorted((made / "checkpoints").glob("step-*"))[-1] / "meta.json"
    content = json.loads(meta.read_text())
    del content["config"]["model"]
    meta.write_text(json.dumps(content))
    before = files(made)
    proc = cli(f"resume={made}", "trainer.max_steps=6", cwd=tmp_path)
    assert "meta.json" in one_error_line(proc, "resume:")
    assert files(made) == before


@pytest.mark.slow
def test_a_failed_resume_changes_nothing_and_a_plain_resume_still_works(corpus, tmp_path):
    run = tmp_path / "adagrad"
    short_run(corpus, run, tmp_path, "optimizer=adagrad")
    before = files(run)
    # onecycle cycles a momentum Adagrad does not have: found before anything is written
    proc = cli(f"resume={run}", "scheduler=onecycle", "trainer.max_steps=8", cwd=tmp_path)
    one_error_line(proc, "scheduler.cycle_momentum:")
    assert files(run) == before
    proc = cli(f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_a_resume_may_switch_the_scheduler_option(corpus, tmp_path):
    import yaml

    run = tmp_path / "switch"
    short_run(corpus, run, tmp_path, "scheduler=step", "scheduler.step_size=2",
              "scheduler.warmup_steps=1")
    proc = cli(f"resume={run}", "scheduler=cosine", "trainer.max_steps=6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((run / ".hydra/overrides.yaml").read_text())
    assert "scheduler=cosine" in saved and not [o for o in saved if "step_size" in o]
    assert "scheduler: cosine" in (run / ".hydra/hydra.yaml").read_text()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_a_path_with_any_characters_resumes_with_the_printed_command(corpus, tmp_path):
    run = tmp_path / "wörk, [x] it's" / "run=1"
    args = tiny(corpus, "trainer.max_steps=400", "trainer.log_every=1", "trainer.eval_every=100",
                f"hydra.run.dir={quote(str(run))}")
    proc = subprocess.Popen([sys.executable, "-m", "trainrun", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = run / "train.log"
    wait_for(lambda: log.exists() and "step 2/" in log.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    printed = re.search(r"to continue: (trainrun .*)$", out, re.M).group(1)
    stopped = json.loads((run / "metrics.json").read_text())["steps"]
    bin_dir = str(Path(sys.executable).parent)
    again = subprocess.run(f"{printed} trainer.max_steps={stopped + 2}", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    assert json.loads((run / "metrics.json").read_text())["steps"] == stopped + 2


@pytest.mark.slow
def test_a_full_disk_at_start_up_fails_in_one_line_and_leaves_nothing(corpus, tmp_path):
    """A real file system with no space left: the run's first files cannot be written; it
    says so in one line, removes what it wrote, and the same command runs once there is
    space."""
    import shutil

    from helpers import small_tmpfs_works

    fs = tmp_path / "fs"
    if shutil.which("unshare") is None or not small_tmpfs_works(fs):
        pytest.skip("no tmpfs can be mounted here (unshare --user --mount)")
    script = ('fs=$1; shift; mount -t tmpfs -o size=4m tmpfs "$fs" || exit 99; '
              'head -c 8M /dev/zero > "$fs/filler" 2>/dev/null; "$@"; echo "status $?"; '
              'ls -A "$fs"; rm "$fs/filler"; "$@" > /dev/null 2>&1; echo "again $?"; ls -A "$fs/run"')
    args = tiny(corpus, "trainer.max_steps=2", "trainer.eval_every=2", f"hydra.run.dir={fs}/run")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           script, "sh", fs, sys.executable, "-m", "trainrun", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"trainrun: failed: no space left on device while starting the run "
                           f"in {fs}/run (writing {fs}/run/"), line
    assert line.endswith("nothing it wrote was kept; free space, then run the same command "
                         "again"), line
    shown = proc.stdout.split("status ", 1)[1].splitlines()
    assert shown[0] == "1" and shown[1:3] == ["filler", "again 0"], proc.stdout
    assert {"checkpoints", "metrics.json", ".hydra", "train.log"} <= set(shown[3:])
