"""Every schedule (docs/schedules.md) against an independent reference, at every update k = 1..N.

References are torch's own scheduler classes stepping a float64 optimizer (the lr in force
after e calls of scheduler.step(), e = k − W − 1), or the closed forms of the docs, TF and
transformers written out here: never the code under test. Schedules are built from the real
conf/scheduler/<option>.yaml defaults with the changes a case names; short real training
runs then check that train/lr logs exactly lr(1..N).
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
import torch
from helpers import config, scalars, tiny, train
from omegaconf import OmegaConf
from torch.optim import lr_scheduler as sched

from trainrun.errors import ConfigError
from trainrun.schedules import SCHEDULES, build_schedule

N = 300
BASE = 0.01


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(option: str, **changes):
    """The schema instance of conf/scheduler/<option>.yaml, with `changes`."""
    path = resources.files("trainrun.conf") / "scheduler" / f"{option}.yaml"
    values = OmegaConf.to_container(OmegaConf.load(str(path)))
    values.pop("defaults")
    return SCHEDULES[option](**{**values, **changes})


def after_steps(make_scheduler, base: float, count: int, optimizer=None) -> list[float]:
    """lr in force after e = 0..count−1 calls of scheduler.step(), on a float64 SGD."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = optimizer or torch.optim.SGD([p], lr=base)
    s = make_scheduler(opt)
    lrs = []
    for _ in range(count):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs


def torch_decay(make_scheduler):
    """Reference of the post-warmup part: (base, D) -> D rates."""
    return lambda base, d: after_steps(make_scheduler, base, d)


def warmup_then(decay):
    """The warmup base·k/W for k <= W, then `decay` over D = N − W."""
    return lambda base, n, w: [base * k / w for k in range(1, w + 1)] + decay(base, n - w)


def tf_polynomial(end_lr, power, steps, cycle):
    def decay(base, d):
        out = []
        for e in range(d):
            s = steps
            if cycle:
                s = steps * (1 if e == 0 else math.ceil(e / steps))
            out.append((base - end_lr) * (1 - min(e, s) / s) ** power + end_lr)
        return out
    return decay


def hf_wsd(decay_steps, decay_type, min_lr):
    """transformers' _get_wsd_scheduler_lambda after its warmup, at current_step = W + e."""
    def decay(base, d):
        stable, ratio, out = d - decay_steps, min_lr / base, []
        for e in range(d):
            if e < stable:
                out.append(base)
                continue
            progress = (e - stable) / max(1, decay_steps)
            factor = {"linear": 1.0 - progress,
                      "cosine": 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)),
                      "1-sqrt": 1.0 - math.sqrt(progress)}[decay_type]
            out.append(base * max(0.0, factor * (1.0 - ratio) + ratio))
        return out
    return decay


def sgdr_with_decay(t0, t_mult, eta_min, cycle_decay):
    """CosineAnnealingWarmRestarts' step() bookkeeping, with the peak lowered per restart."""
    def decay(base, d):
        t_cur, t_i, cycle, out = 0, t0, 0, []
        for _ in range(d):
            peak = base * cycle_decay ** cycle
            out.append(eta_min + (peak - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2)
            t_cur += 1
            if t_cur >= t_i:
                t_cur, t_i, cycle = t_cur - t_i, t_i * t_mult, cycle + 1
        return out
    return decay


def noam(scale, d_model, w):
    return lambda base, n, _w: [scale * d_model ** -0.5 * min(k ** -0.5, k * w ** -1.5)
                                for k in range(1, n + 1)]


def inverse_sqrt(w):
    return lambda base, n, _w: [base * k / w if k <= w else base * math.sqrt(w / k)
                                for k in range(1, n + 1)]


def onecycle(**kwargs):
    return lambda base, n, _w: after_steps(
        lambda o: sched.OneCycleLR(o, max_lr=base, total_steps=n, **kwargs), base, n)


@dataclass
class Case:
    id: str
    option: str
    changes: dict
    reference: object  # (base, N, W) -> [lr(1), ..., lr(N)]
    warmups: bool = True  # also run with warmup_steps and warmup_ratio


TF_EXP = lambda rate, steps, stair: lambda b, d: [  # noqa: E731
    b * rate ** (math.floor(e / (steps or d)) if stair else e / (steps or d)) for e in range(d)]

CASES = [
    Case("constant", "constant", {}, warmup_then(lambda b, d: [b] * d)),
    Case("step", "step", dict(step_size=7, gamma=0.5),
         warmup_then(torch_decay(lambda o: sched.StepLR(o, 7, gamma=0.5)))),
    Case("step-slow", "step", dict(step_size=50, gamma=0.9),
         warmup_then(torch_decay(lambda o: sched.StepLR(o, 50, gamma=0.9)))),
    Case("multistep", "multistep", dict(milestones=[10, 100, 200], gamma=0.3),
         warmup_then(torch_decay(lambda o: sched.MultiStepLR(o, [10, 100, 200], gamma=0.3)))),
    Case("exponential", "exponential", dict(gamma=0.98),
         warmup_then(torch_decay(lambda o: sched.ExponentialLR(o, gamma=0.98)))),
    Case("exponential-tf", "exponential", dict(gamma=None, decay_rate=0.5, decay_steps=40),
         warmup_then(TF_EXP(0.5, 40, False))),
    Case("exponential-tf-staircase", "exponential",
         dict(gamma=None, decay_rate=0.5, decay_steps=40, staircase=True),
         warmup_then(TF_EXP(0.5, 40, True))),
    Case("exponential-tf-run-long", "exponential", dict(gamma=None, decay_rate=0.1),
         warmup_then(TF_EXP(0.1, None, False))),
    Case("cosine", "cosine", dict(min_lr=0.0),
         warmup_then(lambda b, d: after_steps(lambda o: sched.CosineAnnealingLR(o, d), b, d))),
    Case("cosine-min_lr", "cosine", dict(min_lr=1e-4),
         warmup_then(lambda b, d: after_steps(
             lambda o: sched.CosineAnnealingLR(o, d, eta_min=1e-4), b, d))),
    Case("cosine_restarts", "cosine_restarts", dict(T_0=20, T_mult=2, min_lr=1e-4),
         warmup_then(torch_decay(
             lambda o: sched.CosineAnnealingWarmRestarts(o, 20, 2, eta_min=1e-4)))),
    Case("cosine_restarts-T_mult1", "cosine_restarts", dict(T_0=50, T_mult=1, min_lr=0.0),
         warmup_then(torch_decay(lambda o: sched.CosineAnnealingWarmRestarts(o, 50, 1)))),
    Case("cosine_restarts-cycle_decay", "cosine_restarts",
         dict(T_0=20, T_mult=2, min_lr=1e-5, cycle_decay=0.6),
         warmup_then(sgdr_with_decay(20, 2, 1e-5, 0.6))),
    Case("linear", "linear", dict(min_lr=0.0),
         warmup_then(lambda b, d: after_steps(
             lambda o: sched.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=d), b, d))),
    Case("linear-min_lr", "linear", dict(min_lr=1e-4),
         warmup_then(lambda b, d: after_steps(lambda o: sched.LinearLR(
             o, start_factor=1.0, end_factor=1e-4 / b, total_iters=d), b, d))),
    Case("polynomial", "polynomial", dict(power=2.0, end_lr=0.0),
         warmup_then(lambda b, d: after_steps(
             lambda o: sched.PolynomialLR(o, total_iters=d, power=2.0), b, d))),
    Case("polynomial-short", "polynomial", dict(power=1.5, end_lr=0.0, decay_steps=100),
         warmup_then(torch_decay(lambda o: sched.PolynomialLR(o, total_iters=100, power=1.5)))),
    Case("polynomial-tf-end_lr", "polynomial", dict(power=2.0, end_lr=1e-4, decay_steps=60),
         warmup_then(tf_polynomial(1e-4, 2.0, 60, False))),
    Case("polynomial-tf-cycle", "polynomial",
         dict(power=0.5, end_lr=1e-4, decay_steps=60, cycle=True),
         warmup_then(tf_polynomial(1e-4, 0.5, 60, True))),
    Case("wsd-linear", "wsd", dict(decay_steps=80, decay_ratio=None, decay_type="linear",
                                   min_lr=1e-4), warmup_then(hf_wsd(80, "linear", 1e-4))),
    Case("wsd-cosine", "wsd", dict(decay_steps=80, decay_ratio=None, decay_type="cosine",
                                   min_lr=0.0), warmup_then(hf_wsd(80, "cosine", 0.0))),
    Case("wsd-1-sqrt-ratio", "wsd", dict(decay_ratio=0.2, decay_type="1-sqrt", min_lr=1e-4),
         warmup_then(hf_wsd(60, "1-sqrt", 1e-4))),  # 0.2 × N = 60
    Case("onecycle", "onecycle", {}, onecycle(), warmups=False),
    Case("onecycle-linear-three_phase", "onecycle",
         dict(anneal_strategy="linear", three_phase=True, pct_start=0.25, div_factor=10.0,
              final_div_factor=100.0),
         onecycle(anneal_strategy="linear", three_phase=True, pct_start=0.25, div_factor=10.0,
                  final_div_factor=100.0), warmups=False),
    Case("onecycle-cos-three_phase", "onecycle", dict(three_phase=True, pct_start=0.4),
         onecycle(three_phase=True, pct_start=0.4), warmups=False),
    Case("onecycle-linear", "onecycle", dict(anneal_strategy="linear", pct_start=0.45),
         onecycle(anneal_strategy="linear", pct_start=0.45), warmups=False),
    Case("noam", "noam", dict(warmup_steps=40, scale=2.0, d_model=64), noam(2.0, 64, 40),
         warmups=False),
    Case("noam-ratio", "noam", dict(warmup_steps=None, warmup_ratio=0.2, scale=1.0, d_model=512),
         noam(1.0, 512, 60), warmups=False),
    Case("noam-longer-than-run", "noam", dict(warmup_steps=1000, scale=1.0, d_model=256),
         noam(1.0, 256, 1000), warmups=False),
    Case("inverse_sqrt", "inverse_sqrt", dict(warmup_steps=40), inverse_sqrt(40), warmups=False),
    Case("inverse_sqrt-ratio", "inverse_sqrt", dict(warmup_steps=None, warmup_ratio=0.1),
         inverse_sqrt(30), warmups=False),
]
WARMUPS = {"no-warmup": (dict(warmup_steps=None, warmup_ratio=None), 0),
           "warmup_steps": (dict(warmup_steps=30, warmup_ratio=None), 30),
           "warmup_ratio": (dict(warmup_steps=None, warmup_ratio=0.15), 45)}


def assert_close(actual: list[float], expected: list[float], rel: float = 1e-9) -> None:
    assert len(actual) == len(expected)
    for k, (a, x) in enumerate(zip(actual, expected, strict=True), start=1):
        assert abs(a - x) <= rel * abs(x), f"lr({k}) = {a!r}, reference {x!r}"


def test_every_option_has_cases():
    assert {c.option for c in CASES} | {"plateau"} == set(SCHEDULES)


@pytest.mark.parametrize("case, warmup", [
    pytest.param(c, w, id=f"{c.id}-{w}") for c in CASES
    for w in (WARMUPS if c.warmups else ["own"])])
def test_matches_reference_at_every_update(case, warmup):
    changes, w = WARMUPS.get(warmup, ({}, None))
    cfg = make(case.option, **case.changes, **changes)
    cfg.validate("scheduler", N, BASE)
    schedule = build_schedule(cfg, BASE, N, d_model=128)
    assert_close([schedule(k) for k in range(1, N + 1)], case.reference(BASE, N, w))


def test_noam_d_model_defaults_to_the_models():
    bound = build_schedule(make("noam", warmup_steps=40, scale=1.0, d_model=None), BASE, N, 96)
    assert_close([bound(k) for k in range(1, N + 1)], noam(1.0, 96, 40)(BASE, N, 40))
    notes = " ".join(bound.notes())
    assert "optimizer.lr=0.01 is not used" in notes and "not shorter" not in notes


def test_noam_warmup_longer_than_the_run_is_allowed_and_noted():
    cfg = make("noam", warmup_steps=1000)
    cfg.validate("scheduler", N, BASE)  # no error
    notes = build_schedule(cfg, BASE, N, 128).notes()
    assert any("warmup of 1000 updates is not shorter than trainer.max_steps=300" in n
               for n in notes)


# --- onecycle momentum ------------------------------------------------------------------

def two_groups(optimizer_cls, **kwargs):
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    return optimizer_cls([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=BASE,
                         **kwargs)


@pytest.mark.parametrize("optimizer_cls, kwargs, key", [
    (torch.optim.SGD, dict(momentum=0.9), "momentum"),
    (torch.optim.AdamW, dict(betas=(0.9, 0.99)), "betas"),
])
@pytest.mark.parametrize("changes", [
    {}, dict(three_phase=True, anneal_strategy="linear", pct_start=0.2,
             base_momentum=0.8, max_momentum=0.9)])
def test_onecycle_cycles_momentum_as_torch(optimizer_cls, kwargs, key, changes):
    ours, theirs = two_groups(optimizer_cls, **kwargs), two_groups(optimizer_cls, **kwargs)
    cfg = make("onecycle", **changes)
    schedule = build_schedule(cfg, BASE, N)
    reference = sched.OneCycleLR(theirs, max_lr=BASE, total_steps=N, **{
        k: v for k, v in dataclasses.asdict(cfg).items()
        if k in ("pct_start", "anneal_strategy", "div_factor", "final_div_factor",
                 "three_phase", "cycle_momentum", "base_momentum", "max_momentum")})
    for k in range(1, N + 1):
        if k > 1:
            theirs.step()
            reference.step()
        lr = schedule.apply(ours, k)
        for g, h in zip(ours.param_groups, theirs.param_groups, strict=True):
            assert abs(g["lr"] - h["lr"]) <= 1e-9 * h["lr"] and lr == g["lr"]
            m, r = (g[key][0], h[key][0]) if key == "betas" else (g[key], h[key])
            assert abs(m - r) <= 1e-9 * r, f"update {k}: momentum {m} != {r}"
            if key == "betas":
                assert g["betas"][1] == 0.99


def test_onecycle_without_cycle_momentum_leaves_momentum_alone():
    opt = two_groups(torch.optim.AdamW, betas=(0.9, 0.99))
    build_schedule(make("onecycle", cycle_momentum=False), BASE, N).apply(opt, 10)
    assert all(g["betas"] == (0.9, 0.99) for g in opt.param_groups)


def test_onecycle_momentum_needs_an_optimizer_with_momentum():
    opt = two_groups(torch.optim.Adagrad)
    with pytest.raises(ConfigError) as err:
        build_schedule(make("onecycle"), BASE, N).apply(opt, 1)
    assert err.value.key == "scheduler.cycle_momentum"


# --- plateau ------------------------------------------------------------------------------

EVAL_EVERY = 10
LOSSES = {k: 3 + 2 * math.exp(-k / 50) + 0.05 * math.sin(k * 1.3)
          for k in range(EVAL_EVERY, N + 1, EVAL_EVERY)}


def plateau_reference(w: int, losses: dict[int, float], base: float = BASE, n: int = N,
                      **kwargs) -> list[float]:
    """ReduceLROnPlateau fed the evaluations made after update W or later."""
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base)
    reference = sched.ReduceLROnPlateau(opt, **kwargs)
    lrs = []
    for k in range(1, n + 1):
        lrs.append(base * k / w if k <= w else opt.param_groups[0]["lr"])
        if k in losses and k >= w:
            reference.step(losses[k])
    return lrs


PLATEAU = [
    dict(factor=0.5, patience=1, threshold=1e-2, threshold_mode="rel", cooldown=0, min_lr=0.0),
    dict(factor=0.7, patience=0, threshold=0.02, threshold_mode="abs", cooldown=2, min_lr=0.0),
    dict(factor=0.5, patience=0, threshold=0.0, threshold_mode="rel", cooldown=0, min_lr=2e-3),
    dict(factor=0.3, patience=2, threshold=1e-3, threshold_mode="rel", cooldown=1, min_lr=1e-4,
         mode="max"),
]


def run_plateau(schedule, losses: dict[int, float], ks) -> list[float]:
    """What fit() does: apply before update k, observe the evaluation after it."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    lrs = []
    for k in ks:
        lrs.append(schedule.apply(opt, k))
        if k in losses:
            schedule.observe(losses[k])
    return lrs


@pytest.mark.parametrize("w", [0, 25, 30])
@pytest.mark.parametrize("keys", PLATEAU, ids=["rel", "abs-cooldown", "min_lr", "max"])
def test_plateau_matches_reduce_lr_on_plateau(keys, w):
    losses = {k: 10 - v for k, v in LOSSES.items()} if keys.get("mode") == "max" else LOSSES
    cfg = make("plateau", **keys, warmup_steps=w, warmup_ratio=None)
    cfg.validate("scheduler", N, BASE)
    expected = plateau_reference(w, losses, **keys)
    assert len(set(expected[w:])) >= 3  # the test sees several reductions
    assert_close(run_plateau(build_schedule(cfg, BASE, N), losses, range(1, N + 1)), expected)


def test_plateau_counts_evaluations_from_update_w_on():
    """The evaluation after update W (the peak) counts; those during warmup do not."""
    cfg = make("plateau", factor=0.5, patience=0, threshold=0.0, threshold_mode="rel",
               warmup_steps=30, warmup_ratio=None)
    losses = {20: 0.5, 30: 1.0, 40: 2.0, 50: 1.5, 60: 0.9}
    lrs = run_plateau(build_schedule(cfg, BASE, N), losses, range(1, N + 1))
    assert lrs[29] == BASE and lrs[30:40] == [BASE] * 10  # 30 sets the best; 20 is ignored
    assert lrs[40:50] == [BASE / 2] * 10 and lrs[50:] == [BASE / 4] * (N - 50)


def test_plateau_ignores_reductions_below_eps_as_torch():
    keys = dict(factor=0.5, patience=0, threshold=0.0, threshold_mode="rel", cooldown=0,
                min_lr=0.995e-6)
    cfg = make("plateau", **keys, warmup_steps=None, warmup_ratio=None)
    lrs = run_plateau(build_schedule(cfg, 1e-6, N), LOSSES, range(1, N + 1))
    expected = plateau_reference(0, LOSSES, base=1e-6, **keys)
    assert set(expected) == {1e-6}  # 5e-9 is below ReduceLROnPlateau's eps
    assert_close(lrs, expected)


def test_plateau_state_survives_a_checkpoint_mid_run():
    keys = PLATEAU[1]
    cfg = make("plateau", **keys, warmup_steps=20, warmup_ratio=None)
    first = build_schedule(cfg, BASE, N)
    lrs = run_plateau(first, LOSSES, range(1, 151))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert len(state["evals"]) == 15
    resumed = build_schedule(cfg, BASE, N)
    resumed.load_state_dict(state)
    lrs += run_plateau(resumed, LOSSES, range(151, N + 1))
    uninterrupted = run_plateau(build_schedule(cfg, BASE, N), LOSSES, range(1, N + 1))
    assert lrs == uninterrupted
    assert_close(lrs, plateau_reference(20, LOSSES, **keys))


def test_schedules_without_val_loss_have_no_state():
    schedule = build_schedule(make("cosine"), BASE, N)
    schedule.observe(1.0)
    assert schedule.state_dict() == {} and schedule(100) == build_schedule(make("cosine"), BASE,
                                                                           N)(100)


# --- validation ---------------------------------------------------------------------------

INVALID = [
    ("cosine", dict(warmup_steps=10, warmup_ratio=0.1), "warmup_steps", "given together"),
    ("cosine", dict(warmup_steps=100, warmup_ratio=None), "warmup_steps",
     "warmup of 100 updates is not shorter than trainer.max_steps=100"),
    ("constant", dict(warmup_ratio=0.999), "warmup_ratio", "not shorter than"),
    ("linear", dict(warmup_ratio=1.0), "warmup_ratio", "allowed: 0 <= warmup_ratio < 1"),
    ("step", dict(warmup_steps=-5), "warmup_steps", "allowed: an integer >= 0"),
    ("step", dict(step_size=0), "step_size", "allowed: an integer >= 1"),
    ("step", dict(gamma=0.0), "gamma", "allowed: 0 < gamma <= 1"),
    ("step", dict(gamma=-0.5), "gamma", "allowed: 0 < gamma <= 1"),
    ("step", dict(gamma=1.5), "gamma", "allowed: 0 < gamma <= 1"),
    ("multistep", dict(milestones=[50, 30]), "milestones", "not strictly increasing"),
    ("multistep", dict(milestones=[30, 30]), "milestones", "not strictly increasing"),
    ("multistep", dict(milestones=[0, 30]), "milestones", "outside 1..99"),
    ("multistep", dict(milestones=[30, 100]), "milestones", "outside 1..99"),
    ("multistep", dict(milestones=[30, 95], warmup_steps=10), "milestones", "outside 1..89"),
    ("multistep", dict(milestones=[]), "milestones", "is empty"),
    ("multistep", dict(milestones=[30], gamma=0.0), "gamma", "allowed: 0 < gamma <= 1"),
    ("exponential", dict(gamma=0.0), "gamma", "allowed: 0 < gamma <= 1"),
    ("exponential", dict(gamma=None, decay_rate=None), "decay_rate", "set one of them"),
    ("exponential", dict(gamma=0.9, decay_rate=0.5), "decay_rate", "set scheduler.gamma=null"),
    ("exponential", dict(gamma=None, decay_rate=-0.5), "decay_rate", "0 < decay_rate <= 1"),
    ("exponential", dict(gamma=None, decay_rate=0.5, decay_steps=0), "decay_steps",
     "allowed: an integer >= 1"),
    ("exponential", dict(staircase=True), "staircase", "decay_rate form only"),
    ("cosine", dict(min_lr=-1e-4), "min_lr", "allowed: a finite number >= 0"),
    ("cosine_restarts", dict(T_0=0), "T_0", "allowed: an integer >= 1"),
    ("cosine_restarts", dict(T_mult=0), "T_mult", "allowed: an integer >= 1"),
    ("cosine_restarts", dict(cycle_decay=0.0), "cycle_decay", "0 < cycle_decay <= 1"),
    ("cosine_restarts", dict(min_lr=-1.0), "min_lr", ">= 0"),
    ("onecycle", dict(pct_start=0.0), "pct_start", "allowed: 0 < pct_start < 1"),
    ("onecycle", dict(pct_start=1.0), "pct_start", "allowed: 0 < pct_start < 1"),
    ("onecycle", dict(pct_start=1.5), "pct_start", "allowed: 0 < pct_start < 1"),
    ("onecycle", dict(pct_start=0.01), "pct_start", "longer than 1 update"),
    ("onecycle", dict(pct_start=0.5, three_phase=True), "pct_start", "0 < pct_start < 0.5"),
    ("onecycle", dict(warmup_steps=10), "warmup_steps", "onecycle has its own warmup"),
    ("onecycle", dict(warmup_ratio=0.1), "warmup_ratio", "onecycle has its own warmup"),
    ("onecycle", dict(anneal_strategy="exp"), "anneal_strategy", "allowed: cos, linear"),
    ("onecycle", dict(div_factor=0.0), "div_factor", "allowed: a finite number > 0"),
    ("onecycle", dict(final_div_factor=-1.0), "final_div_factor", "> 0"),
    ("onecycle", dict(base_momentum=0.99), "base_momentum", "exceeds scheduler.max_momentum"),
    ("onecycle", dict(max_momentum=1.0), "max_momentum", "0 <= max_momentum < 1"),
    ("linear", dict(min_lr=-1.0), "min_lr", ">= 0"),
    ("polynomial", dict(power=0.0), "power", "allowed: a finite number > 0"),
    ("polynomial", dict(end_lr=-1e-3), "end_lr", ">= 0"),
    ("polynomial", dict(decay_steps=0), "decay_steps", "allowed: an integer >= 1"),
    ("noam", dict(scale=0.0), "scale", "> 0"),
    ("noam", dict(scale=-1.0), "scale", "> 0"),
    ("noam", dict(d_model=0), "d_model", "allowed: an integer >= 1"),
    ("noam", dict(warmup_steps=None), "warmup_steps", "noam needs at least 1"),
    ("noam", dict(warmup_steps=0), "warmup_steps", "noam needs at least 1"),
    ("noam", dict(warmup_steps=10, warmup_ratio=0.1), "warmup_steps", "given together"),
    ("inverse_sqrt", dict(warmup_steps=0), "warmup_steps", "inverse_sqrt needs at least 1"),
    ("inverse_sqrt", dict(warmup_steps=100), "warmup_steps", "not shorter than"),
    ("wsd", dict(decay_steps=10, decay_ratio=0.2), "decay_steps", "exactly one"),
    ("wsd", dict(decay_steps=None, decay_ratio=None), "decay_steps", "exactly one"),
    ("wsd", dict(decay_ratio=0.0), "decay_ratio", "0 < decay_ratio <= 1"),
    ("wsd", dict(decay_ratio=None, decay_steps=96), "decay_steps", "allowed: 1..95"),
    ("wsd", dict(decay_type="exp"), "decay_type", "allowed: linear, cosine, 1-sqrt"),
    ("wsd", dict(min_lr=-1.0), "min_lr", ">= 0"),
    ("plateau", dict(factor=1.0), "factor", "allowed: 0 < factor < 1"),
    ("plateau", dict(factor=0.0), "factor", "allowed: 0 < factor < 1"),
    ("plateau", dict(factor=1.5), "factor", "allowed: 0 < factor < 1"),
    ("plateau", dict(patience=-1), "patience", "allowed: an integer >= 0"),
    ("plateau", dict(threshold=-0.1), "threshold", ">= 0"),
    ("plateau", dict(threshold=1.0), "threshold", "0 <= threshold < 1"),
    ("plateau", dict(threshold_mode="pct"), "threshold_mode", "allowed: rel, abs"),
    ("plateau", dict(mode="avg"), "mode", "allowed: min, max"),
    ("plateau", dict(cooldown=-1), "cooldown", "allowed: an integer >= 0"),
    ("plateau", dict(min_lr=-1.0), "min_lr", ">= 0"),
]


@pytest.mark.parametrize("option, changes, key, message", INVALID,
                         ids=[f"{o}-" + "-".join(f"{k}={v}" for k, v in c.items())
                              for o, c, _, _ in INVALID])
def test_invalid_keys_are_rejected(option, changes, key, message):
    with pytest.raises(ConfigError) as err:
        make(option, **changes).validate("scheduler", 100, BASE)
    assert err.value.key == f"scheduler.{key}"
    assert message in err.value.message


# --- floors: no schedule ends above its peak (optimizer.lr) ---------------------------------

FLOORS = [("cosine", "min_lr"), ("cosine_restarts", "min_lr"), ("linear", "min_lr"),
          ("polynomial", "end_lr"), ("wsd", "min_lr"), ("plateau", "min_lr")]


def test_every_rate_key_of_every_option_is_checked_against_the_peak():
    """A rate key (*_lr) added to an option must join FLOORS, and so get the check."""
    rate_keys = {(option, f.name) for option, schema in SCHEDULES.items()
                 for f in dataclasses.fields(schema) if f.name.endswith("_lr")}
    assert rate_keys == set(FLOORS)  # noam and inverse_sqrt have no floor: they decay to 0


@pytest.mark.parametrize("option, key", FLOORS)
def test_a_floor_above_the_peak_is_refused(option, key):
    with pytest.raises(ConfigError) as err:
        make(option, **{key: 0.1}).validate("scheduler", N, 0.003)
    assert str(err.value) == (f"scheduler.{key}: 0.1 is above optimizer.lr=0.003, the peak; "
                              f"allowed: 0 <= {key} <= optimizer.lr")
    with pytest.raises(ConfigError):  # just above
        make(option, **{key: BASE * (1 + 1e-9)}).validate("scheduler", N, BASE)


@pytest.mark.parametrize("option, key", FLOORS)
def test_a_floor_equal_to_the_peak_is_a_constant(option, key):
    cfg = make(option, **{key: BASE})
    cfg.validate("scheduler", N, BASE)
    w = cfg.warmup(N)
    lrs = run_plateau(build_schedule(cfg, BASE, N), LOSSES, range(1, N + 1))
    assert_close(lrs, [BASE * k / w for k in range(1, w + 1)] + [BASE] * (N - w))


def test_cosine_restarts_floor_is_checked_against_the_last_cycles_peak():
    """cycle_decay=0.5 halves each restart's peak. Cycles of 20, 40, 80, 160 updates: a run
    of 300 reaches cycle 3 (peak BASE/8) at e = 140, one of 100 only cycle 2 (BASE/4)."""
    cfg = make("cosine_restarts", T_0=20, T_mult=2, cycle_decay=0.5, min_lr=0.002)
    lrs = [build_schedule(cfg, BASE, N)(k) for k in range(1, N + 1)]
    assert lrs[141] > lrs[140] == BASE / 8  # unchecked, cycle 3 would climb from BASE/8
    with pytest.raises(ConfigError) as err:
        cfg.validate("scheduler", N, BASE)
    assert err.value.key == "scheduler.min_lr"
    assert err.value.message == ("0.002 is above 0.00125, the peak of the run's last cycle "
                                 "(optimizer.lr=0.01 × cycle_decay^3); allowed: 0 <= min_lr "
                                 "<= 0.00125, or a cycle_decay closer to 1")
    cfg.validate("scheduler", 100, BASE)  # cycle 2's peak, 0.0025, is above 0.002
    make("cosine_restarts", T_0=20, T_mult=2, cycle_decay=0.5,
         min_lr=BASE / 8).validate("scheduler", N, BASE)


@pytest.mark.parametrize("div_factor, final_div_factor, key", [
    (0.5, 1e4, "div_factor"),  # starts at 2 × the peak
    (1.0, 0.5, "final_div_factor"),  # ends at 2 × the peak
    (4.0, 0.2, "final_div_factor"),  # ends at 1.25 × the peak
    (1.0, 1.0, None),  # flat at the peak: allowed
    (4.0, 0.25, None),  # ends at the peak
    (25.0, 1e4, None),  # torch's defaults
])
def test_onecycle_first_and_last_rates_may_not_exceed_the_peak(div_factor, final_div_factor,
                                                               key):
    cfg = make("onecycle", div_factor=div_factor, final_div_factor=final_div_factor)
    reference = onecycle(div_factor=div_factor, final_div_factor=final_div_factor)(BASE, N, None)
    above_peak = max(reference[0], reference[-1]) > BASE * (1 + 1e-12)
    assert above_peak == (key is not None)
    if key is None:
        cfg.validate("scheduler", N, BASE)
        return
    with pytest.raises(ConfigError) as err:
        cfg.validate("scheduler", N, BASE)
    assert err.value.key == f"scheduler.{key}" and "above optimizer.lr=0.01, the peak" in str(
        err.value)


def test_every_default_is_valid():
    for option in SCHEDULES:
        make(option).validate("scheduler", 500, BASE)


@pytest.mark.parametrize("overrides, key", [
    (["scheduler.warmup_steps=10"], "scheduler.warmup_steps"),  # cosine has warmup_ratio
    (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=500"], "scheduler.warmup_steps"),
    (["scheduler=multistep", "scheduler.milestones=[300,200]"], "scheduler.milestones"),
    (["scheduler=onecycle", "scheduler.pct_start=1.2"], "scheduler.pct_start"),
    (["scheduler=plateau", "scheduler.factor=2"], "scheduler.factor"),
])
def test_composed_config_fails_before_training(overrides, key):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert err.value.key == key


# --- real runs: train/lr at every update --------------------------------------------------

RUN_N = 16
RUNS = {
    "constant": (["scheduler.warmup_steps=4"], warmup_then(lambda b, d: [b] * d), 4),
    "step": (["scheduler.warmup_steps=3", "scheduler.step_size=4", "scheduler.gamma=0.5"],
             warmup_then(torch_decay(lambda o: sched.StepLR(o, 4, gamma=0.5))), 3),
    "multistep": (["scheduler.warmup_steps=3", "scheduler.milestones=[3,8]"],
                  warmup_then(torch_decay(lambda o: sched.MultiStepLR(o, [3, 8], gamma=0.1))),
                  3),
    "exponential": (["scheduler.warmup_steps=2", "scheduler.gamma=0.8"],
                    warmup_then(torch_decay(lambda o: sched.ExponentialLR(o, 0.8))), 2),
    "cosine": (["scheduler.warmup_ratio=0.25", "scheduler.min_lr=1e-4"],
               warmup_then(lambda b, d: after_steps(
                   lambda o: sched.CosineAnnealingLR(o, d, eta_min=1e-4), b, d)), 4),
    "cosine_restarts": (["scheduler.warmup_steps=2", "scheduler.T_0=3", "scheduler.T_mult=2",
                         "scheduler.min_lr=1e-4"],
                        warmup_then(torch_decay(lambda o: sched.CosineAnnealingWarmRestarts(
                            o, 3, 2, eta_min=1e-4))), 2),
    "onecycle": ([], onecycle(), None),
    "linear": (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=4"],
               warmup_then(lambda b, d: after_steps(
                   lambda o: sched.LinearLR(o, 1.0, 0.0, total_iters=d), b, d)), 4),
    "polynomial": (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=3"],
                   warmup_then(torch_decay(lambda o: sched.PolynomialLR(o, 13, power=2.0))), 3),
    "noam": (["scheduler.warmup_steps=40", "scheduler.scale=1.0"], noam(1.0, 32, 40), None),
    "inverse_sqrt": (["scheduler.warmup_steps=4"], inverse_sqrt(4), None),
    "wsd": (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=2",
             "scheduler.decay_ratio=null", "scheduler.decay_steps=6",
             "scheduler.decay_type=cosine", "scheduler.min_lr=1e-4"],
            warmup_then(hf_wsd(6, "cosine", 1e-4)), 2),
    "plateau": (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=2",
                 "scheduler.patience=0", "scheduler.threshold=0.5", "trainer.eval_every=3"],
                None, 2),
}


def test_every_option_has_a_run():
    assert set(RUNS) == set(SCHEDULES)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("option", list(RUNS))
def test_training_logs_lr_of_every_update(option, accum, tmp_path: Path, corpus):
    overrides, reference, w = RUNS[option]
    base = 0.01
    train(tmp_path, *tiny(corpus, f"scheduler={option}", *overrides, f"optimizer.lr={base}",
                          f"trainer.max_steps={RUN_N}", f"trainer.grad_accum_steps={accum}"))
    logged = scalars(tmp_path, "train/lr")
    assert [k for k, _ in logged] == list(range(1, RUN_N + 1))  # each update exactly once
    if option == "plateau":
        val = dict(scalars(tmp_path, "val/loss"))
        assert list(val) == [3, 6, 9, 12, 15, 16]
        keys = dict(factor=0.5, patience=0, threshold=0.5, threshold_mode="rel", cooldown=0,
                    min_lr=0.0)
        expected = plateau_reference(w, val, base=base, n=RUN_N, **keys)
        assert len(set(expected[w:])) >= 3  # reductions happened
        states = sorted(tmp_path.glob("checkpoints/step-*/trainer_state.pt"))
        evals = torch.load(states[-1], weights_only=True)["schedule"]["evals"]
        assert [k for k, _ in evals] == list(val)
        assert all(math.isclose(loss, val[k], rel_tol=2**-23) for k, loss in evals)
    else:
        expected = reference(base, RUN_N, w)
    for (k, lr), x in zip(logged, expected, strict=True):
        assert math.isclose(lr, x, rel_tol=2**-23), f"train/lr at {k}: {lr} != {x}"
    if option == "noam":
        log = (tmp_path / "train.log").read_text()
        assert "optimizer.lr=0.01 is not used" in log
        assert "warmup of 40 updates is not shorter than trainer.max_steps=16" in log
