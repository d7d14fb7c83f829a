"""Optimizers (docs/optimizers.md): LARS and LAMB against separately written float64 implementations
of the papers' update equations, their state through a save/load round trip, the parameter
groups, the fused/foreach choice, validation, and every option training the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import cli, config, scalars, tiny, train, weights

from trainrun.errors import ConfigError
from trainrun.models import GPT, parameter_kinds
from trainrun.optimizers import OPTIMIZERS, build_optimizer, kernel_options, param_groups
from trainrun.optimizers.layerwise import LAMB, LARS
from trainrun.optimizers.muon import MuonAdamW
from trainrun.optimizers.schedule_free import ScheduleFreeAdamW
from trainrun.optimizers.standard import LAMBConfig, LARSConfig

STEPS = 6
LR = 0.1
SCHEDULER = {"schedulefree": "constant"}  # the one it takes


class Net(torch.nn.Module):
    """Two weight matrices, their biases and a norm: every kind that LARS treats apart."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.ln = torch.nn.LayerNorm(3)
        self.b = torch.nn.Linear(3, 2)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().double()
    with torch.no_grad():
        net.b.bias.zero_()  # a zero tensor: trust ratio 1
        net.ln.weight.uniform_(0.5, 1.5)
        net.ln.bias.normal_()
    return net


def gradients(net: Net, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=gen, dtype=torch.float64)
             for n, p in net.named_parameters()} for _ in range(steps)]


def run(optimizer, net, grads):
    for step in grads:
        for n, p in net.named_parameters():
            p.grad = step[n].clone()
        optimizer.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def lars_paper(weights, grads, lr, momentum, weight_decay, eta, excluded, no_decay):
    """You et al. 2017, Algorithm 1, layer by layer: λ = η‖w‖/(‖∇L‖ + β‖w‖),
    v ← m·v + γ·λ·(∇L + β·w), w ← w − v, v₀ = 0 (constant γ). Excluded layers: λ = 1."""
    w = {n: t.clone() for n, t in weights.items()}
    v = {n: torch.zeros_like(t) for n, t in weights.items()}
    for g in grads:
        for n in w:
            beta = 0.0 if n in no_decay else weight_decay
            w_norm = math.sqrt(sum(x * x for x in w[n].flatten().tolist()))
            g_norm = math.sqrt(sum(x * x for x in g[n].flatten().tolist()))
            local = 1.0
            if n not in excluded and w_norm > 0 and g_norm > 0:
                local = eta * w_norm / (g_norm + beta * w_norm)
            v[n] = momentum * v[n] + lr * local * (g[n] + beta * w[n])
            w[n] = w[n] - v[n]
    return w


def lamb_paper(weights, grads, lr, beta1, beta2, eps, weight_decay, no_decay):
    """You et al. 2019, Algorithm 2 (φ = identity), layer by layer."""
    w = {n: t.clone() for n, t in weights.items()}
    m = {n: torch.zeros_like(t) for n, t in weights.items()}
    v = {n: torch.zeros_like(t) for n, t in weights.items()}
    for t, g in enumerate(grads, start=1):
        for n in w:
            lam = 0.0 if n in no_decay else weight_decay
            m[n] = beta1 * m[n] + (1 - beta1) * g[n]
            v[n] = beta2 * v[n] + (1 - beta2) * g[n] * g[n]
            m_hat = m[n] / (1 - beta1**t)
            v_hat = v[n] / (1 - beta2**t)
            r = m_hat / (v_hat.sqrt() + eps) + lam * w[n]
            w_norm, r_norm = float(w[n].norm()), float(r.norm())
            ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            w[n] = w[n] - lr * ratio * r
    return w


def names_of(net: Net, kinds: list[str]) -> set[str]:
    k = parameter_kinds(net)
    return {n for n in k if k[n] in kinds}


def lars_config(no_decay):
    return LARSConfig(lr=LR, weight_decay=0.01, no_decay=no_decay, momentum=0.9,
                      trust_coef=0.02, exclude=["bias", "norm"])


def lamb_config(no_decay):
    return LAMBConfig(lr=LR, weight_decay=0.05, no_decay=no_decay, betas=(0.9, 0.99), eps=1e-6)


@pytest.mark.parametrize("no_decay", [["bias", "norm", "embedding"], []])
def test_lars_matches_the_paper(no_decay):
    net, cfg = make_net(), lars_config(no_decay)
    grads = gradients(net, STEPS)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    got = run(build_optimizer(cfg, net, torch.device("cpu")), net, grads)
    want = lars_paper(start, grads, LR, 0.9, 0.01, 0.02, names_of(net, ["bias", "norm"]),
                      names_of(net, no_decay))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12, msg=n)
    assert not torch.equal(got["a.weight"], start["a.weight"])


@pytest.mark.parametrize("no_decay", [["bias", "norm", "embedding"], []])
def test_lamb_matches_the_paper(no_decay):
    net, cfg = make_net(), lamb_config(no_decay)
    grads = gradients(net, STEPS)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    got = run(build_optimizer(cfg, net, torch.device("cpu")), net, grads)
    want = lamb_paper(start, grads, LR, 0.9, 0.99, 1e-6, 0.05, names_of(net, no_decay))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12, msg=n)


def test_lars_excludes_biases_and_norms_by_group_flag():
    net = make_net()
    kinds = parameter_kinds(net)
    by_id = {id(p): kinds[n] for n, p in net.named_parameters()}
    groups = param_groups(net, lars_config(["bias", "norm", "embedding"]))
    flags = {by_id[id(p)]: g["lars_exclude"] for g in groups for p in g["params"]}
    assert flags == {"weight": False, "bias": True, "norm": True}


@pytest.mark.parametrize("cfg", [lars_config(["bias"]), lamb_config(["bias"])],
                         ids=["lars", "lamb"])
def test_state_survives_save_and_load(tmp_path, cfg):
    grads = gradients(make_net(), STEPS)
    device = torch.device("cpu")
    straight_net = make_net()
    straight = run(build_optimizer(cfg, straight_net, device), straight_net, grads)

    net = make_net()
    opt = build_optimizer(cfg, net, device)
    run(opt, net, grads[:3])
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    resumed_net = make_net(seed=5)  # different weights until loaded
    resumed_net.load_state_dict(saved["model"])
    resumed_opt = build_optimizer(cfg, resumed_net, device)
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed = run(resumed_opt, resumed_net, grads[3:])
    for n in straight:
        assert torch.equal(resumed[n], straight[n]), n
    state = resumed_opt.state[resumed_net.a.weight]
    expected_keys = {"momentum_buffer"} if isinstance(resumed_opt, LARS) else {
        "step", "exp_avg", "exp_avg_sq"}
    assert set(state) == expected_keys
    if isinstance(resumed_opt, LAMB):
        assert state["step"] == STEPS


def test_param_groups_keep_decay_off_biases_norms_and_embeddings(corpus):
    cfg = config(*tiny(corpus))
    model = GPT(cfg.model, 256)
    kinds = parameter_kinds(model)
    by_id = {id(p): kinds[n] for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, cfg.optimizer)
    assert {by_id[id(p)] for p in decay["params"]} == {"weight"}
    assert "weight_decay" not in decay  # the optimizer's weight_decay
    assert {by_id[id(p)] for p in no_decay["params"]} == {"bias", "norm", "embedding"}
    assert no_decay["weight_decay"] == 0.0
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params

    everything = config(*tiny(corpus, "optimizer.no_decay=[]"))
    (group,) = param_groups(model, everything.optimizer)
    assert len(group["params"]) == n_params
    optimizer = build_optimizer(everything.optimizer, model, torch.device("cpu"))
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("name,cls,kernel", [
    ("adamw", torch.optim.AdamW, "fused"), ("adam", torch.optim.Adam, "fused"),
    ("sgd", torch.optim.SGD, "fused"), ("momentum", torch.optim.SGD, "foreach"),
    ("nesterov", torch.optim.SGD, "foreach"), ("adagrad", torch.optim.Adagrad, "fused"),
    ("rmsprop", torch.optim.RMSprop, "foreach"), ("lars", LARS, None), ("lamb", LAMB, None),
    ("adafactor", torch.optim.Adafactor, "foreach"), ("muon", MuonAdamW, None),
    ("schedulefree", ScheduleFreeAdamW, "foreach"),
])
def test_each_option_builds_its_optimizer(corpus, name, cls, kernel):
    scheduler = [f"scheduler={SCHEDULER[name]}"] if name in SCHEDULER else []
    cfg = config(*tiny(corpus, f"optimizer={name}", *scheduler))
    assert type(cfg.optimizer) is OPTIMIZERS[name]
    optimizer = build_optimizer(cfg.optimizer, torch.nn.Linear(2, 2), torch.device("cpu"))
    assert type(optimizer) is cls
    if kernel:
        assert optimizer.defaults[kernel] is True
    if name in ("momentum", "nesterov"):
        assert optimizer.defaults["momentum"] == 0.9
        assert optimizer.defaults["nesterov"] is (name == "nesterov")


def test_kernel_choice_by_device():
    assert kernel_options(torch.optim.AdamW, torch.device("cuda")) == {"fused": True}
    assert kernel_options(torch.optim.Adagrad, torch.device("cuda")) == {"fused": True}
    assert kernel_options(torch.optim.Adagrad, torch.device("mps")) == {"foreach": True}
    assert kernel_options(torch.optim.RMSprop, torch.device("cuda")) == {"foreach": True}


@pytest.mark.parametrize("overrides,key", [
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas[1]"),
    (["optimizer.betas=[-0.1,0.9]"], "optimizer.betas[0]"),
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["optimizer.eps=0"], "optimizer.eps"),
    (["optimizer.no_decay=[bias,head]"], "optimizer.no_decay"),
    (["optimizer=momentum", "optimizer.momentum=-0.5"], "optimizer.momentum"),
    (["optimizer=momentum", "optimizer.dampening=1.5"], "optimizer.dampening"),
    (["optimizer=nesterov", "optimizer.momentum=0"], "optimizer.momentum"),
    (["optimizer=adagrad", "optimizer.lr_decay=-1"], "optimizer.lr_decay"),
    (["optimizer=adagrad", "optimizer.initial_accumulator_value=-1"],
     "optimizer.initial_accumulator_value"),
    (["optimizer=rmsprop", "optimizer.alpha=1"], "optimizer.alpha"),
    (["optimizer=rmsprop", "optimizer.momentum=1"], "optimizer.momentum"),
    (["optimizer=lars", "optimizer.trust_coef=0"], "optimizer.trust_coef"),
    (["optimizer=lars", "optimizer.exclude=[biases]"], "optimizer.exclude"),
    (["optimizer=lamb", "optimizer.betas=[0.9,1.5]"], "optimizer.betas[1]"),
    (["optimizer=muon", "optimizer.momentum=1"], "optimizer.momentum"),
    (["optimizer=muon", "optimizer.ns_steps=0"], "optimizer.ns_steps"),
    (["optimizer=muon", "optimizer.ns_steps=100"], "optimizer.ns_steps"),
    (["optimizer=muon", "optimizer.adjust_lr_fn=spectral"], "optimizer.adjust_lr_fn"),
    (["optimizer=muon", "optimizer.adamw.lr=0"], "optimizer.adamw.lr"),
    (["optimizer=muon", "optimizer.adamw.betas=[0.9,1.0]"], "optimizer.adamw.betas[1]"),
    (["optimizer=muon", "optimizer.adamw.eps=-1"], "optimizer.adamw.eps"),
    (["optimizer=muon", "optimizer.adamw.weight_decay=-1"], "optimizer.adamw.weight_decay"),
    (["optimizer=muon", "optimizer.adamw.momentum=0.9"], "optimizer.adamw.momentum"),
    (["optimizer=adafactor", "optimizer.beta2_decay=0.5"], "optimizer.beta2_decay"),
    (["optimizer=adafactor", "optimizer.eps=[null]"], "optimizer.eps"),
    (["optimizer=adafactor", "optimizer.eps=[-1,1e-3]"], "optimizer.eps[0]"),
    (["optimizer=adafactor", "optimizer.eps=[0,0]"], "optimizer.eps[0]"),
    (["optimizer=adafactor", "optimizer.eps=[1e-30,1e-3]"], "optimizer.eps[0]"),  # the paper's
    (["optimizer=adafactor", "optimizer.eps=[null,0]"], "optimizer.eps[1]"),
    (["optimizer=adafactor", "optimizer.d=0.5"], "optimizer.d"),
    (["optimizer=schedulefree", "scheduler=constant", "optimizer.betas=[0,0.999]"],
     "optimizer.betas[0]"),
    (["optimizer=schedulefree", "scheduler=constant", "optimizer.r=-1"], "optimizer.r"),
    (["optimizer=schedulefree", "scheduler=constant", "optimizer.weight_lr_power=-1"],
     "optimizer.weight_lr_power"),
    (["optimizer=schedulefree", "scheduler=linear"], "scheduler"),
    (["optimizer=muon", "trainer.strategy=fsdp"], "trainer.strategy"),
    (["optimizer=adafactor", "trainer.strategy=fsdp"], "trainer.strategy"),
])
def test_bad_optimizer_settings_name_the_key(corpus, overrides, key):
    with pytest.raises(ConfigError) as err:
        config(*tiny(corpus, *overrides))
    assert err.value.key == key


def test_adafactor_with_eps_0_is_refused_before_anything_is_written(tmp_path, corpus):
    """It trained once, and saved NaN weights as a good checkpoint."""
    proc = cli(*tiny(corpus, "optimizer=adafactor", "optimizer.eps=[0,0]"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("trainrun: error: optimizer.eps[0]: got 0.0; allowed: null (the "
                           "dtype's eps) or eps1 >= 1.1e-19")
    assert list(tmp_path.iterdir()) == []


def test_adafactor_eps1_at_its_bound_keeps_the_weights_finite(tmp_path, corpus):
    """Far enough below the bound (the paper's 1e-30), eps1² is 0 in float32 and the unused
    tokens' embedding rows (all their gradients 0) become 0/0 at update 1; at the bound the
    weights stay finite."""
    from trainrun.optimizers.standard import EPS1_MIN

    run = tmp_path / "bound"
    train(run, *tiny(corpus, "optimizer=adafactor", "scheduler=constant", "trainer.max_steps=2",
                     f"optimizer.eps=[{EPS1_MIN!r},1e-3]"))
    saved = weights(run / "checkpoints/step-00000002/model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


# lr for the tiny test model where the YAML default (tuned on gpt_tiny) is slow over 15 updates
TRAIN_LR = {"lamb": 0.05}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains(tmp_path, corpus, name):
    lr = [f"optimizer.lr={TRAIN_LR[name]}"] if name in TRAIN_LR else []
    lr += [f"scheduler={SCHEDULER[name]}"] if name in SCHEDULER else []
    run_dir = tmp_path / "run"
    summary = train(run_dir, *tiny(corpus, f"optimizer={name}", *lr, "trainer.max_steps=15"))
    losses = scalars(run_dir, "train/loss")
    assert losses[0][0] == 1 and losses[-1][0] == 15
    assert all(math.isfinite(v) for _, v in losses)
    assert losses[-1][1] < losses[0][1] - 0.3, losses
    assert math.isfinite(summary["val_loss"])
