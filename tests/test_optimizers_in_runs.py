"""muon, adafactor and schedulefree with the rest of trainrun: a stopped and resumed run ends
bit for bit where a full run ends (weights and optimizer state), an update with non-finite
gradients changes nothing (fp32 and the fp16 loss scaler), fp16 skips then trains, and
every clipping mode with accumulation trains."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from conftest import TINY, assert_identical, config, final_weights, scalars, tiny, train

from trainrun import checkpoint
from trainrun.clip import NormClip
from trainrun.data import VOCAB_SIZE
from trainrun.model import GPT
from trainrun.optimizers import build_optimizer
from trainrun.precision import Precision
from trainrun.update import train_update

# each option with what it needs on the tiny model: its scheduler, a larger relative rate
OPTIONS = {
    "muon": ["optimizer=muon"],
    "adafactor": ["optimizer=adafactor", "optimizer.lr=0.3"],
    "schedulefree": ["optimizer=schedulefree", "scheduler=constant", "scheduler.warmup_steps=3"],
}
N = 12


def tensors(obj, prefix: str = "") -> dict[str, object]:
    """Every tensor and number in a nested state, by its path."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in tensors(value, f"{prefix}{i}.").items()}
    return {prefix: obj}


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
    resumed, straight = tensors(final_state(part)["optimizer"]), tensors(final_state(full)["optimizer"])
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        same = torch.equal(resumed[key], value) if isinstance(value, torch.Tensor) else (
            resumed[key] == value)
        assert same, key
    losses = [v for _, v in scalars(full, "train/loss")]
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("mode", ["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_non_finite_gradient_changes_nothing(name, mode):
    cfg = config(*TINY, *OPTIONS[name])
    torch.manual_seed(0)
    model = GPT(cfg.model, VOCAB_SIZE)
    opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    precision = Precision(config(f"precision={mode}").precision, torch.device("cpu"))
    x = torch.randint(0, VOCAB_SIZE, (2, 16))
    batch = [(x, torch.roll(x, -1, 1))]
    clipper = NormClip(1.0, 2.0, False)
    first = train_update(model, batch, 32, opt, clipper, precision, torch.device("cpu"))
    assert first.stepped  # a good update, so that the optimizer has state to protect
    before_weights = copy.deepcopy(model.state_dict())
    before_state = tensors(copy.deepcopy(opt.state_dict()))
    hook = model.blocks[0].mlp.fc.weight.register_hook(lambda g: g * math.inf)
    bad = train_update(model, batch, 32, opt, clipper, precision, torch.device("cpu"))
    hook.remove()
    assert not bad.stepped
    assert_identical(model.state_dict(), before_weights)
    after_state = tensors(opt.state_dict())
    assert after_state.keys() == before_state.keys()
    for key, value in before_state.items():
        same = torch.equal(after_state[key], value) if isinstance(value, torch.Tensor) else (
            after_state[key] == value)
        assert same, key
    again = train_update(model, batch, 32, opt, clipper, precision, torch.device("cpu"))
    assert again.stepped and not torch.equal(model.blocks[0].mlp.fc.weight,
                                             before_weights["blocks.0.mlp.fc.weight"])


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
