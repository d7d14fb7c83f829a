"""Values at the edges: every number of every option, at 0, negative, NaN, ±inf and past
float32/int64, is either taken or refused in one line before anything is built or written;
a model that cannot fit in the machine's memory is refused from its config."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from helpers import cli, config

from trainrun import memory
from trainrun.composition import options
from trainrun.config import GROUPS, validate
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError
from trainrun.models import GPT, GPTConfig
from trainrun.optimizers import build_optimizer
from trainrun.runner import device_and_precision
from trainrun.schedules import build_schedule

VOCAB_SIZE = ByteTokenizer.vocab_size

EDGES = [0, -1, math.nan, math.inf, -math.inf, 1e39, -1e39, 2**63, -(2**63) - 1]


def numbers(schema) -> list[tuple[str, type]]:
    found = []
    for f in dataclasses.fields(schema):
        kind = str(f.type)
        if any(other in kind for other in ("list", "tuple", "str", "bool")):
            continue
        if "int" in kind or "float" in kind:
            found.append((f.name, float if "float" in kind else int))
    return found


def sections() -> list[tuple[list[str], str]]:
    """(the option's overrides, the section) for every option of every group but those that
    need files (data's sources, tokenizer=hf), and the trainer and model sections."""
    found = [([], "trainer"), ([], "model")]
    found += [([f"{group}={option}"], group) for group, registry in GROUPS.items()
              if group != "data" for option in registry if (group, option) != ("tokenizer", "hf")]
    return found


def exercise(cfg) -> None:
    """What a run does with its numbers before training: validate, the machine's checks,
    and the builders of the optimizer, schedule and clipper on a small model."""
    validate(cfg, data=False)
    device, _ = device_and_precision(cfg)
    memory.check(cfg, device)
    small = GPTConfig(d_model=8, n_layers=1, n_heads=1, d_ff=8, dropout=0.0, max_seq_len=4)
    model = GPT(small, 256)
    optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    schedule = build_schedule(cfg.scheduler, cfg.optimizer.lr, cfg.trainer.max_steps,
                              cfg.model.d_model)
    schedule.check(optimizer)
    for k in (1, 2, cfg.trainer.max_steps):
        schedule.apply(optimizer, k)
    cfg.clip.build(model)


@pytest.mark.parametrize("overrides,section", sections(),
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "defaults")
def test_every_number_at_its_edges_is_taken_or_refused_in_one_line(overrides, section):
    # schedulefree takes the constant schedule only (its own one-line rule)
    base = config(*overrides, "trainer.device=cpu",
                  *(["scheduler=constant"] if overrides == ["optimizer=schedulefree"] else []))
    refused = 0
    for name, kind in numbers(type(getattr(base, section))):
        for value in EDGES:
            if kind is int and not (isinstance(value, int)):
                continue  # Hydra refuses a float for an int key when composing (one line)
            cfg = copy.deepcopy(base)
            setattr(getattr(cfg, section), name, value)
            key = None
            try:
                exercise(cfg)
            except ConfigError as error:  # any other exception fails the test
                refused += 1
                key = error.key
                assert "\n" not in str(error)
            # NaN, and past float32 or int64, is never taken
            if not isinstance(value, float) or math.isnan(value) or 3.5e38 < abs(value) < math.inf:
                if isinstance(value, int) and abs(value) < 2**63:
                    continue
                assert key == f"{section}.{name}", (name, value, key)
    assert refused > 0 or not numbers(type(getattr(base, section)))


@pytest.mark.parametrize("overrides,key", [
    (["precision=fp16", "precision.init_scale=1e39"], "precision.init_scale"),
    (["model.d_model=100000", "model.n_heads=2"], "model"),
    (["model.n_layers=100000"], "model"),
    (["model.max_seq_len=100000000"], "model"),
    (["trainer.max_steps=9223372036854775808"], "trainer.max_steps"),
])
def test_the_edges_found_on_the_command_line_are_one_line_before_any_directory(
        tmp_path, overrides, key):
    proc = cli(*overrides, "trainer.device=cpu", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"trainrun: error: {key}: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64),
                                   dict(d_model=48, n_layers=3, n_heads=4, d_ff=100, max_seq_len=7),
                                   dict(d_model=8, n_layers=1, n_heads=1, d_ff=8, max_seq_len=1)])
def test_the_parameter_count_from_the_config_is_the_models(shape):
    cfg = GPTConfig(dropout=0.0, **shape)
    assert cfg.num_params(256) == GPT(cfg, 256).num_params()


# the optimizers' own algorithms: Adam keeps two moments, momentum SGD one buffer, ...
@pytest.mark.parametrize("overrides,values", [
    (["optimizer=adamw"], 2), (["optimizer=adam"], 2), (["optimizer=lamb"], 2),
    (["optimizer=sgd"], 0), (["optimizer=momentum"], 1), (["optimizer=nesterov"], 1),
    (["optimizer=adagrad"], 1), (["optimizer=lars"], 1), (["optimizer=rmsprop"], 1),
    (["optimizer=rmsprop", "optimizer.momentum=0.9"], 2),
    (["optimizer=rmsprop", "optimizer.momentum=0.9", "optimizer.centered=true"], 3),
])
def test_optimizer_state_per_parameter(overrides, values):
    assert memory.state_per_parameter(config(*overrides)) == values


@pytest.mark.parametrize("overrides", [[f"optimizer={o}", "scheduler=constant"]
                                       for o in options("optimizer")] + [
    ["optimizer=rmsprop", "optimizer.momentum=0.9", "optimizer.centered=true"]])
def test_no_optimizer_keeps_as_much_state_as_the_memory_checks_bound(overrides):
    assert memory.state_per_parameter(config(*overrides)) < memory.MOST_STATE


def test_a_model_that_cannot_fit_is_refused_with_both_figures(monkeypatch):
    cfg = config("model.n_layers=100000", "trainer.device=cpu")
    params = cfg.model.num_params(VOCAB_SIZE)
    have, _ = memory.available(torch.device("cpu"))  # read once: free RAM moves
    monkeypatch.setattr(memory, "available", lambda device: (have, "available RAM"))
    with pytest.raises(ConfigError) as err:
        memory.check(cfg, torch.device("cpu"))
    assert f"{params:,} parameters x 16 bytes" in str(err.value)  # AdamW: 4 x (1 + 1 + 2)
    assert memory.gib(params * 16) in str(err.value) and memory.gib(have) in str(err.value)


def test_a_model_close_to_the_limit_gets_a_warning(monkeypatch):
    cfg = config("trainer.device=cpu")
    need = cfg.model.num_params(VOCAB_SIZE) * 16
    monkeypatch.setattr(memory, "available", lambda device: (int(need / 0.9), "RAM"))
    assert "close to the limit" in memory.check(cfg, torch.device("cpu"))
    monkeypatch.setattr(memory, "available", lambda device: (need * 2, "RAM"))
    assert memory.check(cfg, torch.device("cpu")) is None
    # sharded over 4 processes (FSDP), each holds a quarter; replicated (DDP), all of it
    monkeypatch.setattr(memory, "available", lambda device: (need // 3, "RAM"))
    assert memory.check(config("trainer.device=cpu", "trainer.strategy=fsdp"),
                        torch.device("cpu"), processes=4) is None
    with pytest.raises(ConfigError):
        memory.check(cfg, torch.device("cpu"), processes=4)
