"""optimizer=muon: which parameters each side gets (found from the model's modules, not from
parameter_kinds), updates and rates against torch.optim.Muon and torch.optim.AdamW applied
directly with an independently written schedule, and the lr range test on both sides."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_same_state, config, same_gradients, tiny, twins

from trainrun import builders, lrfind, runner
from trainrun.console import Console
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.models import GPT
from trainrun.optimizers import build_optimizer
from trainrun.optimizers.muon import MuonAdamW

N, W = 8, 2  # updates and warmup of the schedule below


def block_matrices(model: GPT) -> set[int]:
    """The Muon side of docs/optimizers.md: the weight matrices of the blocks' Linear layers."""
    return {id(m.weight) for block in model.blocks for m in block.modules()
            if isinstance(m, torch.nn.Linear)}


def muon_config(corpus, *extra: str):
    return config(*tiny(corpus, "optimizer=muon", "optimizer.weight_decay=0.05",
                        "optimizer.adamw.weight_decay=0.02", *extra))


def test_muon_gets_the_block_matrices_and_adamw_the_rest(corpus):
    cfg = muon_config(corpus)
    model = GPT(cfg.model, ByteTokenizer.vocab_size)
    opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    everything = {id(p) for p in model.parameters()}
    assert muon == block_matrices(model)
    assert adamw == everything - muon
    assert id(model.head.weight) in adamw  # tied to the token embedding
    assert len(muon) == 4 * cfg.model.n_layers and all(
        p.ndim == 2 for g in opt.muon.param_groups for p in g["params"])
    # one optimizer to the rest of trainrun: its groups are both sides' own dicts
    assert opt.param_groups == [*opt.muon.param_groups, *opt.adamw.param_groups]
    assert all(a is b for a, b in zip(
        opt.param_groups, [*opt.muon.param_groups, *opt.adamw.param_groups], strict=True))
    # weight decay: Muon's on the matrices; none on the kinds in no_decay (all of AdamW's)
    assert [g["weight_decay"] for g in opt.muon.param_groups] == [0.05]
    assert {g["weight_decay"] for g in opt.adamw.param_groups} == {0.0}
    assert opt.adamw.defaults["weight_decay"] == 0.02 and opt.adamw.defaults["fused"]
    decayed = muon_config(corpus, "optimizer.no_decay=[bias]")
    opt = build_optimizer(decayed.optimizer, model, torch.device("cpu"))
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.adamw.param_groups}
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    assert embeddings <= by_decay[0.02] and not embeddings & by_decay.get(0.0, set())


def reference_factor(k: int) -> float:
    """The cosine schedule with warmup W over N updates, min_lr 0, as a factor of the peak."""
    if k <= W:
        return k / W
    return (1 + math.cos(math.pi * (k - W - 1) / (N - W))) / 2


def test_updates_and_rates_match_torch_muon_and_adamw(corpus):
    cfg = muon_config(corpus, f"trainer.max_steps={N}", f"scheduler.warmup_steps={W}",
                      "scheduler.warmup_ratio=null", "optimizer.adjust_lr_fn=match_rms_adamw",
                      "optimizer.ns_steps=4", "optimizer.momentum=0.9")
    o = cfg.optimizer
    model, opt, schedule, ref_model = twins(cfg)

    matrices = block_matrices(ref_model)
    no_decay = {id(p) for m in ref_model.modules() for p in m.parameters(recurse=False)
                if id(p) not in matrices}  # default no_decay: every other parameter
    ref_muon = torch.optim.Muon([p for p in ref_model.parameters() if id(p) in matrices],
                                lr=o.lr, weight_decay=o.weight_decay, momentum=0.9,
                                nesterov=True, ns_steps=4, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([p for p in ref_model.parameters() if id(p) in no_decay],
                                  lr=o.adamw.lr, betas=tuple(o.adamw.betas), eps=o.adamw.eps,
                                  weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for k in range(1, N + 1):
        lr = schedule.apply(opt, k)
        assert lr == pytest.approx(o.lr * reference_factor(k), rel=1e-12)
        for g in opt.muon.param_groups:
            assert g["lr"] == pytest.approx(o.lr * reference_factor(k), rel=1e-12)
        for g in opt.adamw.param_groups:
            assert g["lr"] == pytest.approx(o.adamw.lr * reference_factor(k), rel=1e-12)
        for g in ref_muon.param_groups:
            g["lr"] = o.lr * reference_factor(k)
        for g in ref_adamw.param_groups:
            g["lr"] = o.adamw.lr * reference_factor(k)
        same_gradients(model, ref_model, gen)
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    start = GPT(cfg.model, ByteTokenizer.vocab_size)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)


def test_lr_range_test_scales_both_sides(corpus, tmp_path):
    cfg = muon_config(corpus)
    device, precision = runner.device_and_precision(cfg)
    console = Console(tmp_path / "lrfind.log")
    try:
        trainer = builders.build_components(cfg, device, precision, console)
        test = lrfind.RangeTest(start_lr=1e-3, end_lr=1e-1, num_updates=3)
        result = lrfind.range_test(trainer, test)
    finally:
        console.close()
    assert result.lrs == [test.lr(i) for i in range(3)]
    last = result.lrs[-1]
    opt = trainer.optimizer
    assert [g["lr"] for g in opt.muon.param_groups] == [last]
    assert all(g["lr"] == pytest.approx(cfg.optimizer.adamw.lr * last / cfg.optimizer.lr)
               for g in opt.adamw.param_groups)


def test_state_round_trip_keeps_the_configured_rates(corpus):
    cfg = muon_config(corpus)
    torch.manual_seed(0)
    model = GPT(cfg.model, ByteTokenizer.vocab_size)
    opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved) == {"muon", "adamw"}
    changed = muon_config(corpus, "optimizer.adamw.lr=1e-4")  # an override on resume
    resumed = build_optimizer(changed.optimizer, model, torch.device("cpu"))
    resumed.load_state_dict(saved)
    assert {g["base_lr"] for g in resumed.adamw.param_groups} == {1e-4}
    assert resumed.param_groups == [*resumed.muon.param_groups, *resumed.adamw.param_groups]
    for side in ("muon", "adamw"):
        assert_same_state(resumed.state_dict()[side]["state"], saved[side]["state"])
    assert set(resumed.state[model.blocks[0].mlp.fc.weight]) == {"momentum_buffer"}
    assert set(resumed.state[model.tok_emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}
