"""Optimizers by name, with torch's parameter names, and their parameter groups
(docs/optimizers.md).
This package's interface: the registry OPTIMIZERS, the schemas' base OptimizerConfig,
build_optimizer, param_groups, and eval_weights (the weights to evaluate and save).

`optimizer=<name>` picks one of OPTIMIZERS, where each option's schema registers itself
(`@register("optimizer", "adamw")`, trainrun.registry); `lr` is the base (peak) rate that the schedule
scales. Parameter groups come from trainrun.models.parameter_kinds: weight decay is kept off
the kinds named in `no_decay` (by default biases, norm gains and embeddings). torch's fused
kernels are used where torch has one for the optimizer on the device, else the foreach
(multi-tensor) ones.

    base.py           OptimizerConfig, param_groups, the fused/foreach choice
    standard.py       adamw, adam, sgd, momentum, nesterov, adagrad, rmsprop, adafactor
                      (torch's), lars, lamb
    layerwise.py      LARS and LAMB, implemented in the project
    muon.py           muon: torch.optim.Muon on the weight matrices, AdamW on the rest
    schedule_free.py  schedulefree: schedule-free AdamW, eval_weights
"""

from __future__ import annotations

import torch

from trainrun.optimizers import muon, standard  # noqa: F401 (their options register)
from trainrun.optimizers.base import SHARDED, OptimizerConfig, kernel_options, param_groups
from trainrun.optimizers.schedule_free import eval_weights
from trainrun.registry import options_of

__all__ = ["OPTIMIZERS", "OptimizerConfig", "build_optimizer", "eval_weights", "kernel_options",
           "param_groups"]

# option -> schema: each schema class registers itself (@register("optimizer", <option>))
OPTIMIZERS: dict[str, type[OptimizerConfig]] = options_of("optimizer")


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module,
                    device: torch.device) -> torch.optim.Optimizer:
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # DTensors
    return cfg.build(param_groups(model, cfg), SHARDED if sharded else device)
