"""Mixed precision and counting updates the way they really happened (docs/precision.md): skipped
updates advance neither k nor the schedule, clipping sees unscaled gradients, fp16 and
bf16 train on the CPU, and max_skipped stops a run that keeps producing non-finite losses."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import (
    TINY,
    assert_identical,
    assert_same_state,
    cli,
    config,
    scalars,
    tiny,
    train,
    weights,
)

from trainrun.clip import NormClip
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.distributed import Replicas
from trainrun.models import GPT
from trainrun.optimizers import build_optimizer, param_groups
from trainrun.precision import Precision
from trainrun.update import train_update

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cosine(k: int, base: float, n: int, w: int) -> float:
    """The cosine schedule with warmup (docs/schedules.md), written out independently."""
    if k <= w:
        return base * k / w
    e, d = k - w - 1, n - w
    return (1 + math.cos(math.pi * e / d)) / 2 * base


def test_fp16_with_a_huge_initial_scale_skips_then_trains(tmp_path, corpus):
    n = 12
    run = tmp_path / "fp16"
    m = train(run, *tiny(corpus, "precision=fp16", "precision.init_scale=1e30",
                         f"trainer.max_steps={n}", "scheduler.warmup_steps=3", "scheduler.warmup_ratio=null",
                         "trainer.log_every=1"))
    assert m["status"] == "completed"
    assert m["steps"] == n
    assert m["skipped_updates"] > 0
    lr = scalars(run, "train/lr")
    assert [s for s, _ in lr] == list(range(1, n + 1))  # no gaps, no repeats
    for k, value in lr:
        assert value == pytest.approx(cosine(k, 3e-3, n, 3), rel=1e-6, abs=1e-12)
    # the scale came down from 1e30 by backing off once per skipped update
    scales = scalars(run, "train/loss_scale")
    assert scales[0][1] == pytest.approx(1e30 * 0.5 ** m["skipped_updates"], rel=1e-6)
    assert scalars(run, "train/skipped_updates")[-1][1] == m["skipped_updates"]
    assert "skipped: non-finite gradients" in (run / "train.log").read_text()
    losses = [v for _, v in scalars(run, "train/loss")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


# AdamW with either kernel (the fused one skips inside its kernel under fp16), and the
# optimizers without a fused kernel whose state is more than tensors per parameter
OPTIMIZERS = {
    "adamw-fused": ["optimizer=adamw"],
    "adamw-foreach": ["optimizer=adamw"],
    "muon": ["optimizer=muon"],
    "adafactor": ["optimizer=adafactor"],
    "schedulefree": ["optimizer=schedulefree", "scheduler=constant"],
}


def build(name: str, model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    if name == "adamw-foreach":
        return torch.optim.AdamW(param_groups(model, cfg.optimizer), lr=1e-3, foreach=True)
    return build_optimizer(cfg.optimizer, model, torch.device("cpu"))


@pytest.mark.parametrize("mode", ["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_non_finite_gradient_changes_nothing(mode, name):
    cfg = config(*TINY, *OPTIMIZERS[name])
    torch.manual_seed(0)
    model = GPT(cfg.model, ByteTokenizer.vocab_size)
    opt = build(name, model, cfg)
    precision = Precision(config(f"precision={mode}").precision, torch.device("cpu"))
    x = torch.randint(0, ByteTokenizer.vocab_size, (2, 16))
    batch = [(x, torch.roll(x, -1, 1))]
    clipper = NormClip(1.0, 2.0, False)
    replicas = Replicas(model)
    first = train_update(replicas, batch, 32, opt, clipper, precision, torch.device("cpu"))
    assert first.stepped  # a good update, so that the optimizer has state to protect
    before_weights = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(opt.state_dict())
    hook = model.blocks[0].mlp.fc.weight.register_hook(lambda g: g * math.inf)
    bad = train_update(replicas, batch, 32, opt, clipper, precision, torch.device("cpu"))
    hook.remove()
    assert not bad.stepped
    assert_identical(model.state_dict(), before_weights)
    assert_same_state(opt.state_dict(), before_state)  # the step counts in the groups too
    again = train_update(replicas, batch, 32, opt, clipper, precision, torch.device("cpu"))
    assert again.stepped and not torch.equal(model.blocks[0].mlp.fc.weight,
                                             before_weights["blocks.0.mlp.fc.weight"])


def every_optimizer() -> list[str]:
    from trainrun.composition.overrides import options

    return options("optimizer")


@pytest.mark.parametrize("name", every_optimizer())
def test_a_skipped_first_update_under_fp16_leaves_the_next_one_exact(name):
    """fp16's loss scaler skips the very first update (non-finite gradients): the next one
    must be exactly the first update of a run that never skipped, with every option's own
    kernels (torch's fused SGD left its momentum buffers unfilled here, and the weights
    blew up an update later)."""
    extra = ["scheduler=constant"] if name == "schedulefree" else []
    cfg = config(*TINY, f"optimizer={name}", *extra)
    skipping = config("precision=fp16").precision
    # the run that never skips starts at the scale the other one backs off to
    steady = config("precision=fp16", f"precision.init_scale="
                    f"{skipping.init_scale * skipping.backoff_factor}").precision
    x = torch.randint(0, ByteTokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = [(x, torch.roll(x, -1, 1))]
    finals = []
    for skip_first in (True, False):
        torch.manual_seed(0)
        model = GPT(cfg.model, ByteTokenizer.vocab_size)
        opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
        scaled = Precision(skipping if skip_first else steady, torch.device("cpu"))
        replicas, clipper = Replicas(model), NormClip(1.0, 2.0, False)
        if skip_first:
            hook = model.blocks[0].mlp.fc.weight.register_hook(lambda g: g * math.inf)
            assert not train_update(replicas, batch, 32, opt, clipper, scaled,
                                    torch.device("cpu")).stepped
            hook.remove()
        assert train_update(replicas, batch, 32, opt, clipper, scaled,
                            torch.device("cpu")).stepped
        finals.append(copy.deepcopy(model.state_dict()))
    assert_identical(*finals)


@pytest.mark.parametrize("optimizer", [["optimizer=adamw"], ["optimizer=sgd", "clip=none"]],
                         ids=["adamw", "sgd"])
def test_max_skipped_stops_a_run_whose_loss_is_never_finite(tmp_path, corpus, optimizer):
    """A huge lr makes the weights overflow at the first update (every loss is then inf or
    nan): the run stops after max_skipped, and those weights are not saved as good."""
    run = tmp_path / "diverged"
    proc = cli(*tiny(corpus, *optimizer, "optimizer.lr=1e30", "scheduler=constant",
                     "trainer.max_skipped=3", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == (
        "trainrun: failed: the weights became non-finite at update 1 (NaN, inf, or too large "
        "for the sum of their squares in float32); nothing was saved for it; there is no "
        "earlier checkpoint; change what made them so (a lower optimizer.lr, clipping, the "
        "optimizer's eps), then start the run again\n")
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "failed"
    assert m["steps"] == 1 and m["skipped_updates"] == 3
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e20])
@pytest.mark.parametrize("where", ["weight", "bias"])  # 9 elements, and 1
def test_the_check_at_save_time_sees_weights_that_are_not_finite(bad, where):
    from types import SimpleNamespace

    from trainrun.loop import weights_finite

    model = torch.nn.Linear(3, 3 if where == "weight" else 1)
    trainer = SimpleNamespace(raw_model=model, replicas=Replicas(model))
    assert weights_finite(trainer)
    with torch.no_grad():
        getattr(model, where).view(-1)[0] = bad
    assert not weights_finite(trainer)


def test_weights_that_overflow_are_not_saved_and_the_last_good_checkpoint_stays(tmp_path,
                                                                                corpus):
    """The save due right after the update that broke the weights (ckpt_every=1) is not
    written; the run resumes from the checkpoint before it."""
    run = tmp_path / "run"
    good = cli(*tiny(corpus, "optimizer=sgd", "optimizer.lr=0.1", "trainer.max_steps=4",
                     "trainer.ckpt_every=2", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    broken = cli(f"resume={run}", "optimizer.lr=1e30", "clip=none", "trainer.max_steps=8",
                 "trainer.ckpt_every=1", cwd=tmp_path)
    assert broken.returncode == 1
    assert broken.stderr == (
        f"trainrun: failed: the weights became non-finite at update 5 (NaN, inf, or too large "
        f"for the sum of their squares in float32); nothing was saved for it; the last good "
        f"checkpoint is step-00000004 and checkpoints/latest names it; change what made them "
        f"so (a lower optimizer.lr, clipping, the optimizer's eps), then continue with: "
        f"trainrun resume={run}\n")
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000004"
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == [
        "step-00000002", "step-00000004"]
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    again = cli(f"resume={run}", "optimizer.lr=0.1", "clip=norm", "trainer.max_steps=6",
                cwd=tmp_path)  # the broken resume's overrides are the run's record now
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "step-00000004" in again.stdout


def test_clipping_sees_unscaled_gradients(tmp_path, corpus):
    """train/grad_norm at k = 1 under fp16 (scale 65536) is the fp32 norm, not 65536× it."""
    norms = {}
    for mode in ("fp32", "fp16"):
        run = tmp_path / mode
        train(run, *tiny(corpus, f"precision={mode}", "trainer.max_steps=1"))
        norms[mode] = scalars(run, "train/grad_norm")[0][1]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.02)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_precision_trains_on_cpu(tmp_path, corpus, mode):
    run = tmp_path / mode
    m = train(run, *tiny(corpus, f"precision={mode}", "trainer.max_steps=20"))
    losses = [v for _, v in scalars(run, "train/loss")]
    assert m["status"] == "completed" and m["steps"] == 20
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("mode, tolerance", [("bf16", 0.05), ("fp16", 0.01)])
def test_accumulation_is_close_in_half_precision(tmp_path, corpus, mode, tolerance):
    final = {}
    for batch_size, accum in [(8, 1), (4, 2), (2, 4)]:
        run = tmp_path / f"{mode}-{batch_size}x{accum}"
        train(run, *tiny(corpus, f"precision={mode}", "data.packing=false",
                         f"data.batch_size={batch_size}", f"trainer.grad_accum_steps={accum}",
                         "trainer.max_steps=6", "optimizer=sgd", "optimizer.lr=0.5",
                         "scheduler=constant"))
        final[accum] = weights(run / "checkpoints/step-00000006/model.safetensors")
    for accum in (2, 4):
        diff = max(((final[accum][k] - final[1][k]).abs().max() / final[1][k].abs().max()).item()
                   for k in final[1])
        assert diff < tolerance, (accum, diff)


def test_auto_is_fp32_on_cpu():
    assert Precision(config("precision=auto").precision, torch.device("cpu")).mode == "fp32"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["fp16", "bf16", "auto"])
def test_cuda_precisions_train_with_fused_adamw(tmp_path, corpus, mode):
    run = tmp_path / mode
    m = train(run, *tiny(corpus, f"precision={mode}", "trainer.device=cuda",
                         "trainer.max_steps=30"))
    losses = [v for _, v in scalars(run, "train/loss")]
    assert m["status"] == "completed" and losses[-1] < losses[0]
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert Precision(config(f"precision={mode}").precision,
                     torch.device("cuda")).mode == (expected if mode == "auto" else mode)
