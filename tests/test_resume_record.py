"""Resume keeps the run's record straight: a completed run is left alone, fewer updates are
refused, a longer run says how its schedule changes, metrics.json counts the whole run, and
a path inside a run directory points at the run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, scalars, tiny, wait_for


def snapshot(run: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in run.rglob("*")}


@pytest.fixture
def run(tmp_path, finished_run) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_resuming_a_completed_run_changes_nothing(run, tmp_path):
    before = snapshot(run)
    proc = cli(f"resume={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (f"trainrun: {run} is already complete at update 40; raise "
                                   f"trainer.max_steps to continue (nothing was changed)")
    assert snapshot(run) == before and not (tmp_path / "outputs").exists()


def test_relaunching_a_finished_resume_auto_command_changes_nothing(run, tmp_path, corpus):
    before = snapshot(run)
    proc = cli(*tiny(corpus, "trainer.max_steps=40", "trainer.ckpt_every=20",
                     "trainer.eval_every=20", "resume=auto", f"hydra.run.dir={run}"),
               cwd=tmp_path)
    assert proc.returncode == 0 and "already complete at update 40" in proc.stderr
    assert snapshot(run) == before


def test_a_resume_to_fewer_updates_is_refused_in_one_line(run, tmp_path):
    before = snapshot(run)
    proc = cli(f"resume={run}", "trainer.max_steps=30", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (f"trainrun: error: trainer.max_steps: got 30, but {run} has reached "
                           f"update 40; allowed: trainer.max_steps > 40 to train longer\n")
    assert snapshot(run) == before  # .hydra/overrides.yaml and config.yaml too


def test_training_longer_prints_the_lr_before_and_after_the_resume_point(run, tmp_path):
    proc = cli(f"resume={run}", "trainer.max_steps=80", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lrs = dict(scalars(run, "train/lr"))  # what the updates really applied
    before, after = lrs[40], lrs[41]
    assert after > 2 * before  # cosine, re-shaped over 80 updates, climbs back
    line = next(ln for ln in proc.stdout.splitlines() if "the schedule now spans" in ln)
    assert (f"the schedule now spans 80 updates (was 40): lr at update 40 was {before:.4g}, at "
            f"update 41 it is {after:.4g} (x{after / before:.3g})") in line


def hparams_entries(run: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    count = 0
    for events in (run / "tb").rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            count += sum(v.tag == "_hparams_/session_start_info" for v in event.summary.value)
    return count


def test_a_stopped_and_resumed_run_reports_the_whole_run_and_writes_hparams_once(
        tmp_path, corpus):
    run = tmp_path / "run"
    exe = Path(sys.executable).with_name("trainrun")
    proc = subprocess.Popen([str(exe), *tiny(corpus, "trainer.max_steps=400", "trainer.log_every=1",
                                             f"hydra.run.dir={run}")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "train.log").exists() and "step 20/" in (run / "train.log").read_text())
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    first = json.loads((run / "metrics.json").read_text())
    assert first["status"] == "stopped" and hparams_entries(run) == 0
    resumed = cli(f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and hparams_entries(run) == 1
    # the whole run: the first process's time up to its checkpoint, then this one's
    assert m["wall_seconds"] > m["session_wall_seconds"] > 0
    assert m["wall_seconds"] == pytest.approx(first["wall_seconds"] + m["session_wall_seconds"],
                                              abs=0.5)
    assert m["tokens_per_sec"] == pytest.approx(m["tokens"] / m["wall_seconds"], rel=1e-3)
    session_tokens = m["tokens"] - first["tokens"]
    assert m["session_tokens_per_sec"] == pytest.approx(
        session_tokens / m["session_wall_seconds"], rel=0.05)


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/step-00000040",
                                    "checkpoints/latest"])
def test_a_path_inside_a_run_directory_points_at_the_run(run, tmp_path, inside):
    proc = cli(f"resume={run / inside}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"trainrun: error: resume: {run / inside} is inside the run "
                                  f"directory {run}; allowed: resume={run} ")


def test_a_changed_option_is_named_as_the_user_writes_it(run, tmp_path):
    proc = cli(f"resume={run}", "optimizer=sgd", "trainer.max_steps=80", cwd=tmp_path)
    assert proc.returncode == 2
    assert "trained with optimizer=adamw" in proc.stderr and "Config" not in proc.stderr


def test_a_run_named_with_any_characters_resumes_as_the_shell_passes_it(run, tmp_path):
    """trainrun resume="$DIR": a comma, brackets, an apostrophe, non-ASCII, a space and `=`
    in the path are the path, not Hydra's syntax; and the quoted form trainrun prints works."""
    named = tmp_path / "wörk, [x] it's" / "run=1"
    named.parent.mkdir()
    run.rename(named)
    proc = cli(f"resume={named}", "trainer.max_steps=41", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {named / 'checkpoints/step-00000040'} at update 40" in proc.stdout
    assert json.loads((named / "metrics.json").read_text())["steps"] == 41
    proc = cli(f'resume="{named}"', "trainer.max_steps=42", cwd=tmp_path)  # the documented form
    assert proc.returncode == 0, proc.stderr
    assert json.loads((named / "metrics.json").read_text())["steps"] == 42


def test_a_sweep_given_one_run_directory_is_refused(run, tmp_path):
    named = tmp_path / "a,b"
    run.rename(named)
    before = snapshot(named)
    proc = cli("-m", f"resume={named}", "trainer.max_steps=50,60", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"trainrun: error: resume: {named}: the jobs of a sweep each "
                                  f"continue their own run directory") and proc.stderr.count("\n") == 1
    assert snapshot(named) == before and not (tmp_path / "multirun").exists()
