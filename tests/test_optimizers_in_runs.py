"""muon, adafactor and schedulefree with the rest of trainrun: a stopped and resumed run ends
bit for bit where a full run ends (weights and optimizer state), fp16 skips then trains, and
the clipping modes with accumulation train. (An update with non-finite gradients changing
nothing: tests/test_precision.py.)"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import assert_identical, assert_same_state, final_weights, scalars, tiny, train

from trainrun import checkpoint

# each option with the scheduler it needs
OPTIONS = {
    "muon": ["optimizer=muon"],
    "adafactor": ["optimizer=adafactor"],
    "schedulefree": ["optimizer=schedulefree", "scheduler=constant", "scheduler.warmup_steps=3"],
}
N = 12


def final_state(run_dir) -> dict:
    name = (run_dir / "checkpoints/latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / name / "trainer_state.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_resume_is_bit_identical(tmp_path, corpus, name):
    # dropout: the RNG restore matters; accumulation: the data position; validations and
    # checkpoints that do not coincide: schedule-free's switches to its eval weights
    args = tiny(corpus, *OPTIONS[name], f"trainer.max_steps={N}", "trainer.ckpt_every=4",
                "trainer.keep_last=10", "trainer.eval_every=5", "model.dropout=0.2",
                "trainer.grad_accum_steps=2")
    full = tmp_path / "full"
    train(full, *args)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for path in checkpoint.complete(part / "checkpoints"):
        if checkpoint.step_number(path) > 8:
            shutil.rmtree(path)
    (part / "checkpoints/latest").write_text(checkpoint.step_name(8) + "\n")
    (part / "metrics.json").unlink()
    summary = train(part, *args, f"resume={part}")
    assert summary["steps"] == N and summary["status"] == "completed"
    assert_identical(final_weights(part), final_weights(full))
    assert_same_state(final_state(part)["optimizer"], final_state(full)["optimizer"])
    losses = [v for _, v in scalars(full, "train/loss")]
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fp16_skips_then_trains(tmp_path, corpus, name):
    n = 8
    run = tmp_path / "fp16"
    m = train(run, *tiny(corpus, *OPTIONS[name], "precision=fp16", "precision.init_scale=1e30",
                         f"trainer.max_steps={n}", "trainer.log_every=1"))
    assert m["status"] == "completed" and m["steps"] == n and m["skipped_updates"] > 0
    assert [s for s, _ in scalars(run, "train/lr")] == list(range(1, n + 1))
    losses = [v for _, v in scalars(run, "train/loss")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("clip", ["value", "adaptive", "agc"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_clipping_mode_with_accumulation_trains(tmp_path, corpus, name, clip):
    run = tmp_path / "run"
    summary = train(run, *tiny(corpus, *OPTIONS[name], f"clip={clip}", "trainer.max_steps=8",
                               "trainer.grad_accum_steps=2", "data.batch_size=2"))
    losses = [v for _, v in scalars(run, "train/loss")]
    assert summary["steps"] == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
