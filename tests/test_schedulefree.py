"""optimizer=schedulefree: the package's AdamWScheduleFree as the reference (its own warmup,
its train and eval points), the eval weights around validation and checkpoints, and the
one scheduler it takes."""

from __future__ import annotations

import copy

import pytest
import schedulefree
import torch
from helpers import (
    assert_identical,
    cli,
    config,
    final_weights,
    same_gradients,
    scalars,
    tiny,
    train,
    twins,
)

from trainrun import checkpoint
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError
from trainrun.models import GPT
from trainrun.optimizers import build_optimizer, eval_weights, param_groups
from trainrun.optimizers.schedule_free import ScheduleFreeAdamW

VOCAB_SIZE = ByteTokenizer.vocab_size

N, W = 10, 4


def sf_config(corpus, *extra: str):
    return config(*tiny(corpus, "optimizer=schedulefree", "scheduler=constant",
                        f"trainer.max_steps={N}", *extra))


def test_warmup_and_both_points_match_the_package(corpus):
    """scheduler=constant with warmup_steps=W is the package's own warmup_steps=W."""
    cfg = sf_config(corpus, f"scheduler.warmup_steps={W}", "optimizer.weight_decay=0.01",
                    "optimizer.no_decay=[]")
    o = cfg.optimizer
    model, opt, schedule, ref_model = twins(cfg)
    ref = schedulefree.AdamWScheduleFree(ref_model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                         eps=o.eps, weight_decay=o.weight_decay, warmup_steps=W,
                                         r=o.r, weight_lr_power=o.weight_lr_power)
    ref.train()
    gen = torch.Generator().manual_seed(1)
    for k in range(1, N + 1):
        assert schedule.apply(opt, k) == pytest.approx(o.lr * min(1, k / W), rel=1e-12)
        same_gradients(model, ref_model, gen)
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):  # y
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    y = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref.eval()
    with eval_weights(opt):
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):  # x
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(model.tok_emb.weight, y["tok_emb.weight"])
    assert_identical({n: p.detach() for n, p in model.named_parameters()}, y)  # y, bit for bit


def test_state_saved_in_eval_mode_resumes_the_train_point(corpus):
    cfg = sf_config(corpus)
    torch.manual_seed(0)
    model = GPT(cfg.model, VOCAB_SIZE)
    opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    assert isinstance(opt, ScheduleFreeAdamW) and opt.param_groups[0]["train_mode"]
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    y = copy.deepcopy(model.state_dict())
    with eval_weights(opt):  # what a checkpoint holds
        saved_x, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = GPT(cfg.model, VOCAB_SIZE)
    fresh.load_state_dict(saved_x)
    fresh_opt = build_optimizer(cfg.optimizer, fresh, torch.device("cpu"))
    fresh_opt.load_state_dict(saved_state)
    assert all(g["train_mode"] for g in fresh_opt.param_groups)
    assert_identical(fresh.state_dict(), y)


def test_validation_and_checkpoints_leave_the_training_unchanged(tmp_path, corpus):
    """Every eval/train switch restores y exactly: validating and saving at every update
    ends where a run that does neither until the end ends, bit for bit."""
    base = tiny(corpus, "optimizer=schedulefree", "scheduler=constant", "trainer.max_steps=9")
    train(tmp_path / "often", *base, "trainer.eval_every=1", "trainer.ckpt_every=1")
    train(tmp_path / "never", *base, "trainer.eval_every=100", "trainer.ckpt_every=100")
    assert_identical(final_weights(tmp_path / "often"), final_weights(tmp_path / "never"))


def test_checkpoint_holds_the_eval_weights(tmp_path, corpus):
    run = tmp_path / "run"
    summary = train(run, *tiny(corpus, "optimizer=schedulefree", "scheduler=constant",
                               "trainer.max_steps=6"))
    cfg = sf_config(corpus)
    model = GPT(cfg.model, VOCAB_SIZE)
    state = checkpoint.load(run / "checkpoints/step-00000006", model)["optimizer"]
    beta1 = state["param_groups"][0]["betas"][0]
    # the state's numbering: the parameters group by group, as the optimizer holds them
    ordered = [p for group in param_groups(model, cfg.optimizer) for p in group["params"]]
    assert len(ordered) == len(state["state"])
    for i, x in enumerate(ordered):  # x = lerp(y, z, 1 − 1/beta1): the package's eval()
        s = state["state"][i]
        expected = torch.lerp(s["train_weights"], s["z"], 1 - 1 / beta1)
        torch.testing.assert_close(x.detach(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(x, s["train_weights"]) or torch.equal(x, s["z"])
    assert summary["status"] == "completed"


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "plateau"])
def test_any_other_scheduler_is_refused(corpus, scheduler):
    with pytest.raises(ConfigError) as err:
        config(*tiny(corpus, "optimizer=schedulefree", f"scheduler={scheduler}"))
    assert err.value.key == "scheduler"
    assert f"{scheduler} with optimizer=schedulefree" in str(err.value)
    assert "allowed: constant" in str(err.value)


def test_alone_it_chooses_the_constant_schedule_and_its_warmup(tmp_path, corpus):
    """`trainrun optimizer=schedulefree`, no scheduler named: it runs, and train/lr is the
    constant schedule with the warmup configured, lr·min(1, k/W)."""
    run = tmp_path / "run"
    proc = cli(*tiny(corpus, "optimizer=schedulefree", f"trainer.max_steps={N}",
                     f"scheduler.warmup_steps={W}", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "options: " in proc.stdout and "scheduler=constant" in proc.stdout
    lr = config(*tiny(corpus, "optimizer=schedulefree")).optimizer.lr
    logged = scalars(run, "train/lr")
    assert [k for k, _ in logged] == list(range(1, N + 1))
    assert [v for _, v in logged] == pytest.approx([lr * min(1, k / W) for k in range(1, N + 1)],
                                                   rel=1e-6)


def test_another_scheduler_named_fails_in_one_line(tmp_path):
    proc = cli("optimizer=schedulefree", "scheduler=cosine", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "trainrun: error: scheduler: cosine with optimizer=schedulefree, which needs no decay "
        "schedule; allowed: constant (add scheduler=constant)")
    assert not (tmp_path / "run").exists() and proc.stdout == ""
