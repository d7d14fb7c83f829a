"""Learning-rate schedules (docs/schedules.md), counted in optimizer updates. This package's
interface: the registry SCHEDULES, the schemas' base SchedulerConfig, the schedule bound to
a run (Schedule), build_schedule and set_lr.

`lr(k)` is the rate that update k = 1..N applies, and what `train/lr` logs at step k.
Warmup, where a schedule has it: lr(k) = base·k/W for k <= W; then the schedule's decay
runs with e = k − W − 1 = 0, 1, ..., D − 1 over D = N − W updates. Each option's schema
(conf/scheduler/<option>.yaml extends `/schemas/scheduler/<option>`) implements `decay(e, D, base)`, or
`lr(k, ...)` when it has its own warmup, and registers itself under its option's name
(`@register("scheduler", "cosine")`, trainrun.registry):

    base.py        SchedulerConfig: warmup, the contract, shared checks
    decays.py      constant, step, multistep, exponential, cosine, cosine_restarts,
                   linear, polynomial, wsd
    own_warmup.py  onecycle, noam, inverse_sqrt
    plateau.py     plateau (ReduceLROnPlateau on val/loss)
"""

from __future__ import annotations

import torch

from trainrun.errors import ConfigError
from trainrun.registry import options_of
from trainrun.schedules import decays, own_warmup, plateau  # noqa: F401 (their options register)
from trainrun.schedules.base import SchedulerConfig

__all__ = ["SCHEDULES", "Schedule", "SchedulerConfig", "build_schedule", "set_lr"]

# option -> schema: each schema class registers itself (@register("scheduler", <option>))
SCHEDULES: dict[str, type[SchedulerConfig]] = options_of("scheduler")


class Schedule:
    """A schedule bound to its run: `schedule(k)` is lr(k). Its state is the validation
    history (k, val/loss) for schedules driven by val/loss (plateau), else empty."""

    def __init__(self, cfg: SchedulerConfig, base_lr: float, max_steps: int):
        self.cfg, self.base_lr, self.max_steps = cfg, base_lr, max_steps
        self.evals: list[tuple[int, float]] = []
        self.k = 0  # the update that apply() last prepared; observe() is measured after it

    def __call__(self, k: int) -> float:
        return self.cfg.lr(k, self.base_lr, self.max_steps, self.evals)

    def apply(self, optimizer: torch.optim.Optimizer, k: int) -> float:
        """Set the parameter groups' rates for update k (set_lr) and, for onecycle with
        cycle_momentum, their momentum or betas[0] as OneCycleLR does; return lr(k)."""
        self.k = k
        lr = self(k)
        set_lr(optimizer, lr, self.base_lr)
        momentum = self.cfg.momentum(k, self.max_steps)
        if momentum is not None:
            for group in optimizer.param_groups:
                _set_momentum(optimizer, group, momentum)
        return lr

    def check(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ConfigError now, before the run starts, if the optimizer cannot follow this
        schedule (a cycled momentum needs momentum or betas)."""
        if self.cfg.momentum(1, self.max_steps) is not None:
            for group in optimizer.param_groups:
                _momentum_key(optimizer, group)

    def observe(self, val_loss: float) -> None:
        """The validation loss measured after the update last applied."""
        if self.cfg.uses_val_loss:
            self.evals.append((self.k, float(val_loss)))

    def notes(self) -> list[str]:
        """Lines for the run's log (noam: optimizer.lr unused; warmup longer than the run)."""
        return self.cfg.notes(self.base_lr, self.max_steps)

    def state_dict(self) -> dict:
        if not self.cfg.uses_val_loss:
            return {}
        return {"evals": [[k, loss] for k, loss in self.evals]}  # plain lists: weights_only

    def load_state_dict(self, state: dict) -> None:
        self.evals = [(int(k), float(loss)) for k, loss in state.get("evals", [])]
        self.k = self.evals[-1][0] if self.evals else 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base: float) -> None:
    """Set every parameter group's rate from lr, the rate for the base optimizer.lr = base.
    A group with a base rate of its own, `base_lr` (optimizer=muon's AdamW side), gets the
    same factor of it: base_lr · lr / base; every other group gets lr itself."""
    for group in optimizer.param_groups:
        own = group.get("base_lr")
        group["lr"] = lr if own is None else own * lr / base


def _momentum_key(optimizer: torch.optim.Optimizer, group: dict) -> str:
    """OneCycleLR's rule, group by group: beta1 where the group has betas, else momentum."""
    for key in ("betas", "momentum"):
        if key in group:
            return key
    raise ConfigError("scheduler.cycle_momentum", f"{type(optimizer).__name__} has neither "
                      f"momentum nor betas; set scheduler.cycle_momentum=false")


def _set_momentum(optimizer: torch.optim.Optimizer, group: dict, momentum: float) -> None:
    if _momentum_key(optimizer, group) == "betas":
        group["betas"] = (momentum, *group["betas"][1:])
    else:
        group["momentum"] = momentum


def build_schedule(cfg: SchedulerConfig, base_lr: float, max_steps: int,
                   d_model: int | None = None) -> Schedule:
    """The schedule of a run of max_steps updates; d_model is the model's (noam's default)."""
    return Schedule(cfg.bind(d_model), base_lr, max_steps)
