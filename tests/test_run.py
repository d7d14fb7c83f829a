"""A short real run through the `trainrun` console script: the run directory, TensorBoard
tags, metrics.json, env.json and what the console shows (docs/outputs.md)."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import subprocess
import sys

import pytest
from helpers import cli, scalars, tiny, train

N, LOG_EVERY, EVAL_EVERY, CKPT_EVERY = 12, 5, 6, 4

VAL_LINE = re.compile(
    r"update (\d+)/(\d+): val_loss (\S+) \(best (\S+)(?:, (improved)| at update (\d+))?\)")


def shown_validations(text: str) -> list[tuple]:
    """(k, N, val_loss, best, "improved" or the update of the best) per validation line."""
    return [(int(k), int(n), float(v), float(best), "improved" if improved else int(at))
            for k, n, v, best, improved, at in VAL_LINE.findall(text)]


def expected_validations(run_dir, n: int) -> list[tuple]:
    """The same worked out from TensorBoard's val/loss: the best is the lowest so far, and a
    validation improves when it is lower than every earlier one."""
    expected, best, best_k = [], math.inf, None
    for k, v in scalars(run_dir, "val/loss"):
        if v < best:
            best, best_k = v, k
        expected.append((k, n, pytest.approx(v, abs=1e-4), pytest.approx(best, abs=1e-4),
                         "improved" if best_k == k else best_k))
    return expected


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """One real run with stdout a pipe (not a terminal), shared by the tests below."""
    cwd = tmp_path_factory.mktemp("cwd")
    run_dir = cwd / "run"
    proc = cli(*tiny(corpus, f"trainer.max_steps={N}", f"trainer.log_every={LOG_EVERY}",
                     f"trainer.eval_every={EVAL_EVERY}", f"trainer.ckpt_every={CKPT_EVERY}",
                     "trainer.keep_last=2", f"hydra.run.dir={run_dir}"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc.stdout


def test_run_directory_layout(run):
    run_dir, _ = run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.json",
                 "env.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000008", "step-00000012"]  # keep_last=2 of 4, 8, 12
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step-00000012"
    for ckpt in ckpts:
        files = {p.name for p in (run_dir / "checkpoints" / ckpt).iterdir()}
        assert files == {"model.safetensors", "trainer_state.pt", "meta.json"}
    assert not list((run_dir / "checkpoints").glob(".tmp*"))


def test_metrics_json(run):
    run_dir, _ = run
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("status", "steps", "tokens", "train_loss", "val_loss", "best_val_loss",
                "skipped_updates", "wall_seconds", "tokens_per_sec"):
        assert key in m, key
    assert m["status"] == "completed"
    assert m["steps"] == N
    assert m["tokens"] == N * 4 * 32  # packed: batch_size 4 × seq_len 32 targets per update
    assert m["skipped_updates"] == 0
    assert m["best_val_loss"] <= m["val_loss"]
    assert m["val_loss"] == pytest.approx(scalars(run_dir, "val/loss")[-1][1], rel=1e-6)
    assert m["tokens_per_sec"] > 0 and m["wall_seconds"] > 0


def test_env_json(run):
    env = json.loads((run[0] / "env.json").read_text())
    assert env["packages"]["torch"] and env["python"] and env["host"]
    assert any("trainer.max_steps" in a for a in env["argv"])


def test_tensorboard_tags(run):
    run_dir, _ = run
    assert [s for s, _ in scalars(run_dir, "train/lr")] == list(range(1, N + 1))
    logged = [1, 5, 10, 12]  # k = 1, every log_every, and the last update
    for tag in ("train/loss", "train/grad_norm", "train/clip_coef", "train/tokens_per_sec",
                "train/skipped_updates"):
        assert [s for s, _ in scalars(run_dir, tag)] == logged, tag
    assert [s for s, _ in scalars(run_dir, "val/loss")] == [6, 12]
    assert scalars(run_dir, "train/loss_scale") == []  # fp32: no loss scaler


def test_plain_output_when_not_a_terminal(run):
    run_dir, stdout = run
    assert "\x1b" not in stdout and "\r" not in stdout
    steps = [int(k) for k in re.findall(r"^step (\d+)/12 \|", stdout, re.M)]
    assert steps == [1, 5, 10, 12]
    assert re.search(r"^update 12/12: val_loss \d+\.\d{4} \(best \d+\.\d{4}"
                     r"(, improved| at update 6)\)$", stdout, re.M)
    shown = shown_validations(stdout)
    assert shown == expected_validations(run_dir, N) and len(shown) == 2
    # one line per validation: besides these, only the final "done:" line names val_loss
    assert sum("val_loss" in line for line in stdout.splitlines()) == len(shown) + 1
    log = (run_dir / "train.log").read_text()
    assert "step 10/12 | loss" in log and "config:" in log and "\x1b" not in log
    assert shown_validations(log) == shown


def test_progress_bar_config_and_validation_on_a_terminal(tmp_path, corpus):
    """Under a pseudo-terminal the resolved config, a rich progress bar with the last
    val_loss, and each validation's line above the bar as it happens are shown."""
    main, child = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainrun", *tiny(corpus, f"hydra.run.dir={tmp_path / 'run'}")],
        stdout=child, stderr=child, cwd=tmp_path, env=env,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "d_model" in plain  # the resolved config
    assert "20/20" in plain and "tok/s" in plain and "ETA" in plain  # the bar's fields
    assert "step 5/20 |" not in plain  # records go to train.log, not over the bar
    log = (tmp_path / "run/train.log").read_text()
    assert "step 5/20 |" in log
    lines = re.split(r"\r\n|\r|\n", plain)
    done = next(i for i, line in enumerate(lines) if "done:" in line)
    shown_at = [i for i, line in enumerate(lines) if VAL_LINE.search(line)]
    assert shown_at and max(shown_at) < done
    shown = shown_validations(plain)
    assert shown == expected_validations(tmp_path / "run", 20) and len(shown) == 2
    assert shown_validations(log) == shown
    bars = [line for line in lines if "ETA" in line]
    val_loss = json.loads((tmp_path / "run/metrics.json").read_text())["val_loss"]
    assert "val_loss -" in bars[0] and f"val_loss {val_loss:.4f}" in bars[-1]


def test_a_validation_that_does_not_improve_names_the_best_update(tmp_path, corpus):
    """A rate too small to move fp32 weights: every validation measures the same loss, so
    only the first improves and the next points back to it."""
    run_dir = tmp_path / "run"
    train(run_dir, *tiny(corpus, "trainer.max_steps=4", "trainer.eval_every=2",
                         "optimizer.lr=1e-30", "scheduler=constant"))
    shown = shown_validations((run_dir / "train.log").read_text())
    assert shown == expected_validations(run_dir, 4)
    assert [where for *_, where in shown] == ["improved", 2]


def test_a_validation_line_without_a_known_best():
    """A NaN first val_loss sets no best (nor does a checkpoint older than best_val_step)."""
    from trainrun.metrics import validation_line

    assert validation_line(3, 10, math.nan, math.inf, 0) == "update 3/10: val_loss nan (best inf)"


@pytest.mark.slow
def test_default_run_trains(tmp_path):
    """`trainrun` with no arguments: under 2 minutes on a 2-core CPU, val loss at most 0.6 ×
    the first logged training loss. Its threads are trainer.threads=auto's, as a user's
    (not the tests' one): the cores the other test workers leave free."""
    proc = cli(f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=240,
               unset=("OMP_NUM_THREADS",))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    first = scalars(tmp_path / "run", "train/loss")[0]
    assert m["status"] == "completed"
    assert first[0] == 1
    assert m["val_loss"] <= 0.6 * first[1], (m["val_loss"], first)
    print(f"default run: {m['wall_seconds']:.1f}s, first loss {first[1]:.3f}, "
          f"val_loss {m['val_loss']:.3f}, ratio {m['val_loss'] / first[1]:.3f}")


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, corpus):
    """Job 0 diverges (its loss is never finite after one update) and fails; job 1 runs."""
    sweep = tmp_path / "sweep"
    proc = cli("-m", *tiny(corpus, "trainer.max_steps=3", "scheduler=constant",
                           "trainer.max_skipped=2"), "optimizer.lr=1e30,1e-3",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # a sweep with a failed job (docs/sweeps.md)
    assert "trainrun: failed:" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("trainrun: 1 of 2 jobs failed; see ")
    assert json.loads((sweep / "0/metrics.json").read_text())["status"] == "failed"
    assert json.loads((sweep / "1/metrics.json").read_text())["status"] == "completed"


def test_a_bad_value_in_a_sweep_fails_before_any_job(tmp_path, corpus):
    proc = cli("-m", *tiny(corpus), "optimizer.lr=1e-3,-1", "optimizer=adamw,adamx",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("trainrun: error: ") and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no multirun/ directory


def test_metrics_json_is_strict_json_when_a_loss_was_never_measured(tmp_path):
    """No validation yet (a run stopped early): the losses are null, not NaN/Infinity."""
    from trainrun.console import Console
    from trainrun.metrics import Metrics

    console = Console(tmp_path / "train.log", interactive=False)
    metrics = Metrics(tmp_path, console, log_every=1, max_steps=10)
    metrics.finish({"status": "stopped", "steps": 0, "tokens": 0, "train_loss": float("nan"),
                    "val_loss": float("nan"), "best_val_loss": float("inf"),
                    "skipped_updates": 0, "tokens_per_sec": float("nan")}, {"lr": 0.1})
    console.close()

    def reject(constant):
        raise ValueError(constant)

    m = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=reject)
    assert m["val_loss"] is None and m["best_val_loss"] is None and m["status"] == "stopped"
