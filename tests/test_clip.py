"""Clipping (docs/optimizers.md): every clip mode against a hand or numpy computation on known
gradients, AutoClip's history through a checkpoint round trip, the logged grad_norm and
clip_coef of a real run, and no host-device synchronization inside a clipper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import config, scalars, tiny, train

from trainrun.clip import (
    CLIPPERS,
    AdaptiveClipConfig,
    AGCConfig,
    NoClipConfig,
    NormClipConfig,
    ValueClipConfig,
)
from trainrun.errors import ConfigError

# Two gradient tensors, flattened: [3, -4, 0, 1, 2, -2] and [0.5, -6, 2].
G1 = [[3.0, -4.0, 0.0], [1.0, 2.0, -2.0]]
G2 = [0.5, -6.0, 2.0]
FLAT = [3.0, -4.0, 0.0, 1.0, 2.0, -2.0, 0.5, -6.0, 2.0]
L2 = math.sqrt(sum(x * x for x in FLAT))  # sqrt(74.25)
NORMS = {1: 20.5, 2: L2, math.inf: 6.0}  # by hand: sum |x|, sqrt(sum x²), max |x|


def params_with(*grads, weights=None) -> list[torch.nn.Parameter]:
    out = []
    for i, g in enumerate(grads):
        g = torch.tensor(g)
        p = torch.nn.Parameter(torch.tensor(weights[i]) if weights else torch.ones_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


def flat_grads(params) -> list[float]:
    return [x for p in params for x in p.grad.flatten().tolist()]


@pytest.mark.parametrize("norm_type", [1, 2, math.inf])
@pytest.mark.parametrize("max_norm", [2.0, 100.0])
def test_norm_clip_global(norm_type, max_norm):
    params = params_with(G1, G2)
    clip = NormClipConfig(max_norm=max_norm, norm_type=norm_type, per_param=False).build(None)
    grad_norm, coef = clip(params)
    expected_coef = max_norm / max(NORMS[norm_type], max_norm)
    assert grad_norm.item() == pytest.approx(L2, rel=1e-6)  # always the L2 norm
    assert coef.item() == pytest.approx(expected_coef, rel=1e-6)
    assert flat_grads(params) == pytest.approx([x * expected_coef for x in FLAT], rel=1e-6)


@pytest.mark.parametrize("norm_type", [1, 2, math.inf])
def test_norm_clip_per_param(norm_type):
    max_norm = 3.0
    own = {1: (12.0, 8.5), 2: (math.sqrt(34.0), math.sqrt(40.25)), math.inf: (4.0, 6.0)}
    params = params_with(G1, G2)
    clip = NormClipConfig(max_norm=max_norm, norm_type=norm_type, per_param=True).build(None)
    grad_norm, coef = clip(params)
    scales = [max_norm / max(n, max_norm) for n in own[norm_type]]
    expected = [x * scales[0] for x in FLAT[:6]] + [x * scales[1] for x in FLAT[6:]]
    assert flat_grads(params) == pytest.approx(expected, rel=1e-6)
    assert grad_norm.item() == pytest.approx(L2, rel=1e-6)
    clipped_l2 = math.sqrt(sum(x * x for x in expected))
    assert coef.item() == pytest.approx(clipped_l2 / L2, rel=1e-6)


def test_value_clip():
    params = params_with(G1, G2)
    grad_norm, coef = ValueClipConfig(max_value=1.5).build(None)(params)
    expected = [min(max(x, -1.5), 1.5) for x in FLAT]
    assert flat_grads(params) == pytest.approx(expected)
    assert grad_norm.item() == pytest.approx(L2, rel=1e-6)
    assert coef.item() == pytest.approx(math.sqrt(sum(x * x for x in expected)) / L2, rel=1e-6)
    zero = params_with([0.0, 0.0])
    grad_norm, coef = ValueClipConfig(max_value=1.5).build(None)(zero)
    assert grad_norm.item() == 0 and coef.item() == 1  # documented: 1 when g = 0


class Small(torch.nn.Module):
    """A weight matrix (3 output rows), its bias, a norm and an embedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 3)
        self.lin = torch.nn.Linear(3, 3)
        self.ln = torch.nn.LayerNorm(3)


def small_with_grads() -> Small:
    model = Small()
    with torch.no_grad():
        model.emb.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        model.lin.weight.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 4.0]]))
        model.lin.bias.copy_(torch.tensor([0.1, 0.0, 0.0]))
    grads = {"emb.weight": [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
             "lin.weight": [[3.0, 0.0, 4.0], [0.0, 0.001, 0.0], [1.0, 1.0, 0.0]],
             "lin.bias": [1.0, 0.0, 0.0], "ln.weight": [5.0, 5.0, 5.0], "ln.bias": [1.0, 1.0, 1.0]}
    for name, p in model.named_parameters():
        p.grad = torch.tensor(grads[name])
    return model


def test_agc_unitwise_by_hand():
    model = small_with_grads()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    clip = AGCConfig(clipping=0.5, eps=1e-3, exclude=["bias", "norm", "embedding"]).build(model)
    params = list(model.parameters())
    grad_norm, coef = clip(params)
    # Rows of lin.weight: ‖W_i‖ = 3, 0 (-> eps), 5; ‖G_i‖ = 5, 0.001, √2;
    # limits 0.5·3 = 1.5, 0.5·1e-3, 0.5·5 = 2.5: rows 0 and 1 are scaled by 1.5/5 and 0.5.
    expected = torch.tensor([[3.0 * 0.3, 0.0, 4.0 * 0.3], [0.0, 0.0005, 0.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(model.lin.weight.grad, expected)
    for name, p in model.named_parameters():  # excluded kinds untouched
        if name != "lin.weight":
            assert torch.equal(p.grad, before[name]), name
    pre = math.sqrt(sum(float((g**2).sum()) for g in before.values()))
    post = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert grad_norm.item() == pytest.approx(pre, rel=1e-6)
    assert coef.item() == pytest.approx(post / pre, rel=1e-6)


def test_agc_without_exclusions_clips_vectors_whole_and_embeddings_by_row():
    model = small_with_grads()
    AGCConfig(clipping=0.5, eps=1e-3, exclude=[]).build(model)(list(model.parameters()))
    # lin.bias: ‖W‖ = 0.1 (whole vector), ‖G‖ = 1 > 0.05: scaled to 0.05.
    torch.testing.assert_close(model.lin.bias.grad, torch.tensor([0.05, 0.0, 0.0]))
    # emb rows: ‖W_0‖ = 1, ‖G_0‖ = 2 > 0.5 -> 0.5; row 1 has no gradient.
    torch.testing.assert_close(model.emb.weight.grad, torch.tensor([[0.5, 0, 0], [0, 0, 0.0]]))
    # ln.weight (ones): ‖W‖ = √3, ‖G‖ = 5√3 -> scaled to 0.5·√3, i.e. by 0.1.
    torch.testing.assert_close(model.ln.weight.grad, torch.full((3,), 0.5))


NORM_SEQUENCE = [5.0, 1.0, 3.0, 8.0, math.inf, 2.0, 7.0, 0.5, 4.0, 6.0, 9.0, 2.5]


def feed(clip, norms, direction):
    """Call the clipper with gradients of the given global norms; yield what it returns."""
    for n in norms:
        (p,) = params_with(direction)
        p.grad.mul_(n)
        grad_norm, coef = clip([p])
        yield n, grad_norm.item(), coef.item(), p.grad.clone()


@pytest.mark.parametrize("percentile,window", [(30.0, 4), (10.0, 1000), (100.0, 3), (50.0, 1)])
def test_autoclip_percentile_of_history(percentile, window):
    direction = [0.6, 0.0, -0.8]  # unit L2 norm
    clip = AdaptiveClipConfig(percentile=percentile, window=window).build(None)
    history: list[float] = []
    for n, grad_norm, coef, grad in feed(clip, NORM_SEQUENCE, direction):
        if not math.isfinite(n):  # a non-finite norm is not remembered
            assert not torch.isfinite(grad).all()
            continue
        history.append(n)  # the current norm is included
        threshold = np.percentile(history[-window:], percentile)  # linear interpolation
        assert grad_norm == pytest.approx(n, rel=1e-6)
        assert coef == pytest.approx(min(1.0, threshold / n), rel=1e-5)
        torch.testing.assert_close(grad, torch.tensor(direction) * min(n, threshold))
    assert clip.state_dict()["count"].item() == len(history)


def test_autoclip_first_update_is_not_clipped():
    clip = AdaptiveClipConfig(percentile=10.0, window=100).build(None)
    ((_, _, coef, _),) = feed(clip, [123.0], [1.0, 0.0])
    assert coef == 1


def test_autoclip_state_round_trip(tmp_path):
    direction = [0.0, 1.0]
    cfg = AdaptiveClipConfig(percentile=25.0, window=5)
    straight = cfg.build(None)
    expected = list(feed(straight, NORM_SEQUENCE, direction))

    first = cfg.build(None)
    list(feed(first, NORM_SEQUENCE[:7], direction))
    torch.save(first.state_dict(), tmp_path / "clip.pt")
    resumed = cfg.build(None)
    resumed.load_state_dict(torch.load(tmp_path / "clip.pt", weights_only=True))
    assert torch.equal(resumed.state_dict()["history"], first.state_dict()["history"])
    assert torch.equal(resumed.state_dict()["count"], first.state_dict()["count"])
    continued = list(feed(resumed, NORM_SEQUENCE[7:], direction))
    for (_, gn, coef, grad), (_, gn2, coef2, grad2) in zip(expected[7:], continued, strict=True):
        assert (gn, coef) == (gn2, coef2)
        assert torch.equal(grad, grad2)


def test_autoclip_smaller_window_keeps_newest_norms():
    first = AdaptiveClipConfig(percentile=50.0, window=5).build(None)
    finite = [n for n in NORM_SEQUENCE if math.isfinite(n)]
    list(feed(first, NORM_SEQUENCE, [1.0]))
    smaller = AdaptiveClipConfig(percentile=50.0, window=3).build(None)
    smaller.load_state_dict(first.state_dict())
    ((_, _, coef, _),) = feed(smaller, [1.0], [1.0])
    threshold = np.percentile(finite[-2:] + [1.0], 50.0)
    assert coef == pytest.approx(min(1.0, threshold / 1.0))


def test_real_run_logs_norm_and_coefficient(tmp_path, corpus):
    run_dir = tmp_path / "run"
    train(run_dir, *tiny(corpus, "clip=norm", "clip.max_norm=0.05", "trainer.max_steps=8",
                         "trainer.log_every=1"))
    norms, coefs = scalars(run_dir, "train/grad_norm"), scalars(run_dir, "train/clip_coef")
    assert [s for s, _ in norms] == [s for s, _ in coefs] == list(range(1, 9))
    for (_, norm), (_, coef) in zip(norms, coefs, strict=True):
        assert coef == pytest.approx(min(1.0, 0.05 / norm), rel=1e-5)
    assert max(c for _, c in coefs) < 1  # the threshold is low enough to clip every update


@pytest.mark.parametrize("option", ["none", "value", "adaptive", "agc"])
def test_every_clip_mode_runs_and_is_saved(tmp_path, corpus, option):
    run_dir = tmp_path / "run"
    summary = train(run_dir, *tiny(corpus, f"clip={option}", "trainer.max_steps=4",
                                   "trainer.log_every=1"))
    assert summary["status"] == "completed" and math.isfinite(summary["train_loss"])
    coefs = [c for _, c in scalars(run_dir, "train/clip_coef")]
    assert len(coefs) == 4 and all(0 < c <= 1 + 1e-6 for c in coefs)
    if option == "none":
        assert coefs == [1.0] * 4
    state = torch.load(run_dir / "checkpoints/step-00000004/trainer_state.pt",
                       weights_only=True)
    if option == "adaptive":
        assert state["clipper"]["count"].item() == 4


# --- no host-device synchronization -------------------------------------------------------

ALL_CLIPPERS = {
    "none": NoClipConfig(),
    "norm": NormClipConfig(max_norm=0.5, norm_type=2, per_param=False),
    "norm_inf_per_param": NormClipConfig(max_norm=0.5, norm_type=math.inf, per_param=True),
    "value": ValueClipConfig(max_value=0.1),
    "adaptive": AdaptiveClipConfig(percentile=50.0, window=8),
    "agc": AGCConfig(clipping=0.01, eps=1e-3, exclude=["bias", "norm"]),
}


@pytest.mark.parametrize("name", ALL_CLIPPERS)
def test_clipper_reads_nothing_back_to_the_host(name, monkeypatch):
    clip_cfg = ALL_CLIPPERS[name]
    model = small_with_grads()
    clip = clip_cfg.build(model)
    params = list(model.parameters())
    clip(params)  # the first call may set up state
    calls = []

    def counting(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *args, **kwargs):
            calls.append(method)
            return original(self, *args, **kwargs)

        return wrapper

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, counting(method))
    grad_norm, coef = clip(params)
    monkeypatch.undo()
    assert calls == []
    for value in (grad_norm, coef):
        assert isinstance(value, torch.Tensor) and value.dim() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_CLIPPERS)
def test_clipper_does_not_synchronize_cuda(name):
    model = small_with_grads().cuda()
    clip = ALL_CLIPPERS[name].build(model)
    params = list(model.parameters())
    clip(params)  # moves AutoClip's history to the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_norm, coef = clip(params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert grad_norm.device.type == coef.device.type == "cuda"


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (["clip.max_norm=0"], "clip.max_norm"),
    (["clip.max_norm=-1"], "clip.max_norm"),
    (["clip.norm_type=3"], "clip.norm_type"),
    (["clip=value", "clip.max_value=0"], "clip.max_value"),
    (["clip=adaptive", "clip.percentile=0"], "clip.percentile"),
    (["clip=adaptive", "clip.percentile=101"], "clip.percentile"),
    (["clip=adaptive", "clip.window=0"], "clip.window"),
    (["clip=agc", "clip.clipping=0"], "clip.clipping"),
    (["clip=agc", "clip.eps=0"], "clip.eps"),
    (["clip=agc", "clip.exclude=[bias,heads]"], "clip.exclude"),
])
def test_bad_clip_settings_name_the_key(corpus, overrides, key):
    with pytest.raises(ConfigError) as err:
        config(*tiny(corpus, *overrides))
    assert err.value.key == key


@pytest.mark.parametrize("option", ["none", "norm", "value", "adaptive", "agc"])
def test_yaml_defaults_validate(corpus, option):
    cfg = config(*tiny(corpus, f"clip={option}"))
    assert type(cfg.clip) is CLIPPERS[option]
    cfg.clip.build(torch.nn.Linear(2, 2))


def test_norm_type_inf_from_the_command_line(corpus):
    assert config(*tiny(corpus, "clip.norm_type=inf")).clip.norm_type == math.inf
