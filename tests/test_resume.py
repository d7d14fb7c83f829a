"""Long jobs survive (docs/long-jobs.md), with real processes and real signals: exact
resume, SIGTERM, a damaged newest checkpoint, and SIGKILL in the middle of writing a
checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_identical,
    cli,
    final_weights,
    scalars,
    small_tmpfs_works,
    tiny,
    wait_for,
)

from trainrun import checkpoint

N = 16


def overrides(corpus, run_dir: Path, *extra: str) -> list[str]:
    # dropout on: the RNG restore matters; accumulation: the data position matters
    return tiny(corpus, f"trainer.max_steps={N}", "trainer.ckpt_every=4", "trainer.keep_last=10",
                "trainer.eval_every=6", "model.dropout=0.2", "trainer.grad_accum_steps=3",
                "trainer.log_every=2", f"hydra.run.dir={run_dir}", *extra)


def rewind(run_dir: Path, copy: Path, step: int) -> Path:
    """A copy of run_dir as it was when checkpoint `step` was the newest."""
    shutil.copytree(run_dir, copy)
    for path in checkpoint.complete(copy / "checkpoints"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (copy / "checkpoints/latest").write_text(checkpoint.step_name(step) + "\n")
    return copy


@pytest.fixture(scope="module")
def full(tmp_path_factory, corpus):
    """An uninterrupted run of N updates."""
    cwd = tmp_path_factory.mktemp("full")
    proc = cli(*overrides(corpus, cwd / "run"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


def test_resume_is_bit_identical(full, tmp_path):
    part = rewind(full, tmp_path / "part", 8)
    proc = cli(f"resume={part}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    assert_identical(final_weights(part), final_weights(full))
    m = json.loads((part / "metrics.json").read_text())
    assert m["status"] == "completed" and m["steps"] == N
    # TensorBoard: the resumed curve continues without duplicated or reordered steps
    assert [s for s, _ in scalars(part, "train/lr")] == list(range(1, N + 1))
    resumed, uninterrupted = scalars(part, "train/loss"), scalars(full, "train/loss")
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in uninterrupted])


@pytest.fixture(scope="module")
def two_threads(tmp_path_factory, corpus):
    """An uninterrupted run of N updates on 2 CPU threads (the tests' processes default to
    1: OMP_NUM_THREADS=1, which trainer.threads=auto takes)."""
    cwd = tmp_path_factory.mktemp("two-threads")
    proc = cli(*overrides(corpus, cwd / "run", "trainer.threads=2"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


def test_a_resume_under_auto_keeps_the_checkpoints_thread_count(two_threads, tmp_path):
    """On the CPU the thread count changes the bits; auto would choose 1 here (the tests'
    OMP_NUM_THREADS=1, as a busier machine would), so the resume takes the 2 the checkpoint
    records, says so, and ends bit for bit where the uninterrupted run did."""
    part = rewind(two_threads, tmp_path / "part", 8)
    proc = cli(f"resume={part}", "trainer.threads=auto", cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert_identical(final_weights(part), final_weights(two_threads))
    (line,) = [x for x in proc.stdout.splitlines() if "CPU thread(s)" in x]
    assert line.startswith("2 CPU thread(s) (the checkpoint's, for a bit-exact resume")
    assert "auto would choose 1 here" in line
    meta = checkpoint.read_meta(two_threads / "checkpoints" / checkpoint.step_name(8))
    assert meta["reproducibility"]["threads"] == 2
    assert meta["reproducibility"]["torch"] == torch.__version__


def test_a_resume_with_another_thread_count_says_it_leaves_the_bits(two_threads, tmp_path):
    part = rewind(two_threads, tmp_path / "part", 8)
    proc = cli(f"resume={part}", "trainer.threads=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if "CPU thread(s)" in x]
    assert line == ("1 CPU thread(s) (trainer.threads=1; the checkpoint was trained with 2: "
                    "the resumed run will not be bit-identical to an uninterrupted one "
                    "(trainer.threads=auto keeps 2))")
    assert checkpoint.read_meta(part / "checkpoints" / checkpoint.step_name(N)
                                )["reproducibility"]["threads"] == 1
    # what the line says: another thread count, other bits
    different = final_weights(part)
    assert any(not torch.equal(v, different[k]) for k, v in final_weights(two_threads).items())


def test_resume_extends_the_run_with_a_larger_max_steps(full, tmp_path):
    run = rewind(full, tmp_path / "extend", N)
    proc = cli(f"resume={run}", f"trainer.max_steps={N + 4}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == N + 4
    assert [s for s, _ in scalars(run, "train/lr")] == list(range(1, N + 5))


def test_resume_refuses_a_different_model_and_leaves_the_run_untouched(full, tmp_path):
    run = rewind(full, tmp_path / "refuse", N)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for change in ("model.d_model=64", "data.seq_len=16", "trainer.seed=7", "optimizer=lars",
                   "optimizer.no_decay=[bias]"):
        proc = cli(f"resume={run}", change, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trainrun: error: "), proc.stderr
        assert change.split("=")[0] in lines[0]
        assert "Traceback" not in proc.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli(f"resume={tmp_path / 'empty'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("trainrun: error: resume:")
    assert not (tmp_path / "outputs").exists()


def test_resume_auto_starts_fresh_then_continues(corpus, tmp_path):
    run = tmp_path / "auto"
    args = overrides(corpus, run, "resume=auto", "trainer.max_steps=8")
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "resumed from" not in first.stdout
    again = cli(*args[:-1], "trainer.max_steps=12", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step-00000008" in again.stdout
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12


def test_resume_auto_with_only_a_damaged_checkpoint_refuses_and_changes_nothing(corpus,
                                                                                 tmp_path):
    """Starting afresh would write a second history over the run's (TensorBoard's steps 1..N
    twice); the newest checkpoint is named, with what is wrong with it."""
    run = tmp_path / "auto"
    args = overrides(corpus, run, "resume=auto", "trainer.max_steps=4")  # one checkpoint: 4
    assert cli(*args, cwd=tmp_path).returncode == 0
    (run / "checkpoints/step-00000004/trainer_state.pt").write_bytes(b"truncated")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = cli(*args[:-1], "trainer.max_steps=8", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    (line,) = again.stderr.splitlines()
    assert line.startswith(f"trainrun: error: resume: auto: no intact checkpoint in "
                           f"{run / 'checkpoints'}: step-00000004 is damaged (trainer_state.pt "
                           f"does not match its sha256 in meta.json)"), line
    assert "allowed: " in line and "hydra.run.dir" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def reject_non_json(constant: str):
    raise ValueError(f"metrics.json holds {constant}, which is not JSON")


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainrun", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_sigterm_checkpoints_and_resume_finishes_identically(full, corpus, tmp_path):
    run = tmp_path / "term"
    proc = start(overrides(corpus, run), tmp_path)
    log = run / "train.log"
    wait_for(lambda: log.exists() and "step 6/" in log.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    m = json.loads((run / "metrics.json").read_text(), parse_constant=reject_non_json)
    assert m["status"] == "stopped"
    stopped_at = m["steps"]
    assert 6 <= stopped_at < N
    assert (run / "checkpoints/latest").read_text().strip() == checkpoint.step_name(stopped_at)
    assert f"trainrun resume={run}" in out
    resumed = cli(f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(final_weights(run), final_weights(full))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(full, tmp_path):
    run = rewind(full, tmp_path / "damaged", 12)
    newest = run / "checkpoints/step-00000012/model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10:] = bytes(10)  # same size, different weights
    newest.write_bytes(bytes(data))
    proc = cli(f"resume={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step-00000012 is damaged" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step-00000008" in proc.stdout
    assert json.loads((run / "metrics.json").read_text())["steps"] == N
    assert_identical(final_weights(run), final_weights(full))
    # the damaged one was set aside and written anew: every checkpoint listed is intact
    assert (run / "checkpoints/.damaged-step-00000012").is_dir()
    listed = checkpoint.complete(run / "checkpoints")
    assert [p.name for p in listed][-2:] == ["step-00000012", "step-00000016"]
    assert all(checkpoint.verify(p) is None for p in listed)


def test_pruning_after_a_damaged_checkpoint_keeps_a_resumable_run(full, tmp_path):
    run = rewind(full, tmp_path / "prune", 12)
    (run / "checkpoints/step-00000012/trainer_state.pt").write_bytes(b"truncated")
    proc = cli(f"resume={run}", "trainer.keep_last=1", "trainer.ckpt_every=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = checkpoint.complete(run / "checkpoints")
    assert [p.name for p in listed] == ["step-00000016"]
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000016"
    assert checkpoint.verify(listed[0]) is None
    again = cli(f"resume={run}", f"trainer.max_steps={N + 1}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(full, corpus, tmp_path):
    run = tmp_path / "killed"
    # the writer pauses with checkpoint 8 half written (TRAINRUN_SAVE_PAUSE), and is killed
    proc = start(overrides(corpus, run), tmp_path, env={"TRAINRUN_SAVE_PAUSE": "1"})
    wait_for(lambda: list((run / "checkpoints").glob(".tmp-step-00000008-*")))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000004"
    assert checkpoint.verify(run / "checkpoints/step-00000004") is None
    assert not (run / "checkpoints/step-00000008").exists()
    resumed = cli(f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000004" in resumed.stdout
    assert_identical(final_weights(run), final_weights(full))
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the leftover was cleaned up


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def assert_failed_at_8_with_4_intact(run: Path, line: str) -> None:
    """The save of update 8 failed: step-00000004 is intact and named by latest, nothing of
    step 8 is left, metrics.json says failed, and the line says all that."""
    ckpts = run / "checkpoints"
    size = sum(f.stat().st_size for f in (ckpts / "step-00000004").iterdir()) / 1024
    assert line.startswith("trainrun: failed: no space left on device while saving checkpoint "
                           "step-00000008 (update 8) in ")
    assert f"it needs about {size:.1f} KiB (the size of step-00000004)" in line
    assert "the previous checkpoint step-00000004 is intact and checkpoints/latest names it" in line
    assert line.endswith(f"; free space, then continue with: trainrun resume={run}")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004"]
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert checkpoint.verify(ckpts / "step-00000004") is None
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_a_full_disk_fails_in_one_line_and_resume_finishes_identically(full, corpus, tmp_path):
    run = tmp_path / "full-disk"
    proc = cli(*overrides(corpus, run), cwd=tmp_path, env={"TRAINRUN_SAVE_FAIL_ENOSPC_AT": "8"})
    assert_failed_at_8_with_4_intact(run, one_line_failure(proc))
    resumed = cli(f"resume={run}", cwd=tmp_path)  # space again
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run}/checkpoints/step-00000004" in resumed.stdout
    assert_identical(final_weights(run), final_weights(full))


@pytest.mark.slow
def test_a_really_full_disk_fails_in_one_line(full, corpus, tmp_path):
    """A real file system that fills up at the second checkpoint, where torch, safetensors
    and TensorBoard each report the full disk their own way."""
    fs = tmp_path / "fs"
    if shutil.which("unshare") is None or not small_tmpfs_works(fs):
        pytest.skip("no tmpfs can be mounted here (unshare --user --mount)")
    one_checkpoint = sum(f.stat().st_size for f in (full / "checkpoints/step-00000004").iterdir())
    size = int(1.6 * one_checkpoint) + 64 * 1024  # the first checkpoint fits, not the second
    copy = tmp_path / "copy"  # the run directory, out of the tmpfs before it goes away
    script = ('fs=$1 size=$2 copy=$3; shift 3; mount -t tmpfs -o size=$size tmpfs "$fs" || '
              'exit 99; "$@"; status=$?; cp -a "$fs/run" "$copy"; exit $status')
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", fs,
         str(size), copy, sys.executable, "-m", "trainrun", *overrides(corpus, fs / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    line = one_line_failure(proc)
    assert_failed_at_8_with_4_intact(copy, line.replace(str(fs / "run"), str(copy)))
    resumed = cli(f"resume={copy}", cwd=tmp_path)  # the run, moved to a roomy disk
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(final_weights(copy), final_weights(full))


def test_a_full_disk_outside_a_save_fails_in_one_line(corpus, tmp_path, monkeypatch, capsys):
    """TensorBoard's writer meets the full disk at update 6: the run stops there, failed."""
    from helpers import train

    from trainrun import runner
    from trainrun.metrics import Metrics

    run, update = tmp_path / "tb-full", Metrics.update
    events = run / "tb" / "events.out.tfevents.test"

    def full_at_6(self, k, *args):
        if k == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(events))
        return update(self, k, *args)
    monkeypatch.setattr(Metrics, "update", full_at_6)
    with pytest.raises(runner.RunStopped) as stop:
        train(run, *overrides(corpus, run))
    assert stop.value.code == 1
    line, = capsys.readouterr().err.strip().splitlines()
    assert line == (f"trainrun: failed: no space left on device while writing {events}; the "
                    f"previous checkpoint step-00000004 is intact and checkpoints/latest names "
                    f"it; free space, then continue with: trainrun resume={run}")
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000004"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_deterministic_runs_and_resume_are_bit_identical(corpus, tmp_path, precision):
    """On a GPU, trainer.deterministic=true makes two runs, and a run resumed from update 8,
    end with the same weights bit for bit (without it, atomics in backward kernels such as
    the embedding's differ in the last bits from run to run)."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    extra = ("trainer.device=cuda", "trainer.deterministic=true", f"precision={precision}")
    first, second = tmp_path / "first", tmp_path / "second"
    for run in (first, second):
        proc = cli(*overrides(corpus, run, *extra), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "trainer.deterministic=true: torch.use_deterministic_algorithms(True)" in proc.stdout
        assert "device cuda" in proc.stdout
    assert_identical(final_weights(second), final_weights(first))
    part = rewind(first, tmp_path / "part", 8)
    proc = cli(f"resume={part}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step-00000008" in proc.stdout
    assert_identical(final_weights(part), final_weights(first))
