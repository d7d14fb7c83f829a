"""Checkpoints for long jobs: a time-based cadence beside ckpt_every, the best checkpoint
kept apart from keep_last, early stopping on val/loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_identical, cli, config, scalars, tiny, train, wait_for, weights

from trainrun import checkpoint
from trainrun.errors import ConfigError

# a rate high enough that val/loss rises and falls again within a few updates
BUMPY = ("scheduler=constant", "optimizer.lr=0.03", "trainer.eval_every=2",
         "trainer.ckpt_every=1000")


def steps(run_dir: Path) -> list[int]:
    return [checkpoint.step_number(p) for p in checkpoint.complete(run_dir / "checkpoints")]


def test_time_based_checkpoints_under_a_short_interval(tmp_path, corpus):
    base = tiny(corpus, "trainer.max_steps=12", "trainer.ckpt_every=1000", "trainer.keep_last=50",
                "trainer.log_every=3")
    train(tmp_path / "off", *base, "trainer.ckpt_every_minutes=null")
    assert steps(tmp_path / "off") == [12]  # the final one only
    # 0.6 ms: due at every check, and checked at every log_every-th update
    train(tmp_path / "on", *base, "trainer.ckpt_every_minutes=0.00001")
    assert steps(tmp_path / "on") == [3, 6, 9, 12]
    # a long interval is never due in a short run
    train(tmp_path / "long", *base, "trainer.ckpt_every_minutes=60")
    assert steps(tmp_path / "long") == [12]


def test_the_default_run_saves_by_time_too():
    assert config().trainer.ckpt_every_minutes == 30


def test_keep_best_survives_keep_last_pruning(tmp_path, corpus):
    overrides = tiny(corpus, "trainer.max_steps=8", *BUMPY)
    train(tmp_path / "best", *overrides, "trainer.keep_best=true", "trainer.keep_last=1")
    val = scalars(tmp_path / "best", "val/loss")
    best_k = min(val, key=lambda kv: kv[1])[0]
    assert best_k < 8  # the point of the test: the best is not the newest
    root = tmp_path / "best" / "checkpoints"
    assert steps(tmp_path / "best") == [8]  # keep_last=1 pruned step best_k
    assert checkpoint.read_meta(root / "best")["step"] == best_k
    assert checkpoint.verify(root / "best") is None
    # the same run, keeping every checkpoint: best/ holds step best_k's files
    train(tmp_path / "all", *overrides, "trainer.keep_last=50", "trainer.ckpt_every=1")
    kept = tmp_path / "all" / "checkpoints" / checkpoint.step_name(best_k)
    assert_identical(weights(root / "best" / "model.safetensors"),
                     weights(kept / "model.safetensors"))
    # and resuming the run still continues from its newest checkpoint, not from best/
    assert checkpoint.complete(root)[-1].name == (root / "latest").read_text().strip()


def test_a_crash_between_keep_bests_renames_leaves_a_best_that_resume_restores(tmp_path, corpus):
    run = tmp_path / "run"
    args = tiny(corpus, "trainer.max_steps=8", "trainer.eval_every=2", "trainer.keep_best=true",
                f"hydra.run.dir={run}")
    # the process pauses once best/ is moved aside, before the new copy takes its place
    proc = subprocess.Popen([sys.executable, "-m", "trainrun", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TRAINRUN_BEST_PAUSE": "600"})
    root = run / "checkpoints"
    wait_for(lambda: (root / ".old-best").is_dir())
    proc.kill()
    proc.wait(timeout=60)
    assert not (root / "best").exists() and (root / ".tmp-best").is_dir()
    best_k = checkpoint.step_number(root / (root / "latest").read_text().strip())
    # keep_best off: best/ after the resume is the one restored, not one saved anew
    resumed = cli(f"resume={run}", "trainer.keep_best=false", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoints/best/ restored from .tmp-best (step {best_k})" in resumed.stdout
    assert checkpoint.verify(root / "best") is None
    assert checkpoint.read_meta(root / "best")["step"] == best_k
    assert not (root / ".old-best").exists() and not (root / ".tmp-best").exists()


def test_early_stopping_after_patience_validations_without_improvement(tmp_path, corpus):
    overrides = tiny(corpus, "trainer.max_steps=30", *BUMPY)
    train(tmp_path / "full", *overrides)
    val = scalars(tmp_path / "full", "val/loss")
    best, since, expected = float("inf"), 0, None
    for k, loss in val:  # the reference: count validations since the best one
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since == 2:
            expected = k
            break
    assert expected is not None and expected < 30
    summary = train(tmp_path / "early", *overrides, "trainer.early_stop_patience=2")
    assert summary["status"] == "completed" and summary["steps"] == expected
    assert steps(tmp_path / "early")[-1] == expected  # saved where it stopped
    assert "early stop: val/loss has not improved for 2 validations" in \
        (tmp_path / "early" / "train.log").read_text()
    assert scalars(tmp_path / "early", "val/loss") == [kv for kv in val if kv[0] <= expected]


@pytest.mark.parametrize("key,value", [("ckpt_every_minutes", "0"), ("ckpt_every_minutes", "-1"),
                                       ("ckpt_every_minutes", "nan"),
                                       ("ckpt_every_minutes", "inf"),
                                       ("early_stop_patience", "0"),
                                       ("early_stop_patience", "-3")])
def test_cadence_keys_refuse_values_that_are_not_positive(key, value):
    with pytest.raises(ConfigError) as err:
        config(f"trainer.{key}={value}")
    assert err.value.key == f"trainer.{key}"


def test_a_refused_value_is_one_line_and_exit_2(tmp_path, corpus):
    proc = cli(*tiny(corpus, "trainer.early_stop_patience=0"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("trainrun: error: trainer.early_stop_patience:")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()
