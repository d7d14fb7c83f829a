"""optimizer=muon: torch.optim.Muon on the blocks' weight matrices, torch.optim.AdamW on
everything else, as one optimizer.

Muon (Jordan et al. 2024) orthogonalizes the momentum of a 2-D weight with Newton-Schulz
iterations; it is meant for the hidden layers' matrices only. Which parameters it gets is
decided by trainrun.models.parameter_kinds: kind `weight` (the attention and MLP matrices
of the blocks) goes to Muon; `embedding` (token and position embeddings, and the output
head, tied to the token embedding or not), `norm` and `bias` go to AdamW.

`optimizer.lr` is Muon's rate and the schedule's base; `optimizer.adamw.lr` is AdamW's,
carried by AdamW's parameter groups as their own base, `base_lr`, so that the schedule
applies the same factor lr(k) / optimizer.lr to both (trainrun.schedules.set_lr).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.optimizers.base import (
    OptimizerConfig,
    kernel_options,
    require_betas,
    require_fraction,
)
from trainrun.registry import register

# The parameter kinds that Muon steps, the rest going to AdamW. torch.optim.Muon takes 2-D
# tensors only; in every model family each parameter of kind `weight` is a Linear layer's
# matrix (the output layer, tied or not, is of kind `embedding`).
MUON_KINDS = ("weight",)
ADJUST_LR_FNS = ("original", "match_rms_adamw")


class BothStates(Mapping):
    """Parameter -> its state, read from either part. Read-only: looking a parameter up in
    the wrong part's defaultdict would add an empty entry there."""

    def __init__(self, *parts: dict):
        self.parts = parts

    def __getitem__(self, p: torch.Tensor) -> dict:
        for part in self.parts:
            if p in part:
                return part[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self.parts:
            yield from part

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)


class MuonAdamW(torch.optim.Optimizer):
    """Two torch optimizers stepped as one: `param_groups` lists Muon's groups, then
    AdamW's (the same dicts, so a rate set here is the rate each of them uses); `step()`
    and `zero_grad()` run both; `state_dict()` is {"muon": ..., "adamw": ...}, each
    torch's own; `state` reads both. torch.amp.GradScaler treats it as any optimizer
    without amp support of its own: it unscales every group, then steps both or neither."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self.state = BothStates(muon.state, adamw.state)

    def step(self, closure=None):
        loss = self.muon.step(closure)  # evaluates the closure, if any
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Both parts' torch state; the AdamW side's base rates stay as configured, like
        optimizer.lr (a resumed run may change either)."""
        base_lrs = [group.get("base_lr") for group in self.adamw.param_groups]
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        for group, base_lr in zip(self.adamw.param_groups, base_lrs, strict=True):
            group["base_lr"] = base_lr
        # torch's load_state_dict gives each part new group dicts and a new state
        self.param_groups[:] = [*self.muon.param_groups, *self.adamw.param_groups]
        self.state = BothStates(self.muon.state, self.adamw.state)


@dataclass
class AdamWSide:
    """The AdamW half of optimizer=muon: embeddings, the head, norms and biases."""

    lr: float = MISSING  # its base (peak) rate; the schedule scales it as optimizer.lr
    betas: tuple[float, float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING  # for the kinds not in no_decay (none, by default)

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.lr", self.lr)
        require_betas(f"{prefix}.betas", self.betas)
        require_positive(f"{prefix}.eps", self.eps)
        require_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)


@register("optimizer", "muon")
@dataclass
class MuonConfig(OptimizerConfig):
    """torch.optim.Muon's keys (lr, weight_decay, momentum, nesterov, ns_steps,
    adjust_lr_fn) for the weight matrices, and `adamw` for the other parameters."""

    momentum: float = MISSING
    nesterov: bool = MISSING
    ns_steps: int = MISSING  # Newton-Schulz iterations, 1..99
    adjust_lr_fn: str = MISSING  # original | match_rms_adamw
    adamw: AdamWSide = field(default_factory=AdamWSide)

    shards: ClassVar[bool] = False  # orthogonalizes whole matrices; two optimizers' state

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_fraction(f"{prefix}.momentum", self.momentum)
        if isinstance(self.ns_steps, bool) or not 1 <= self.ns_steps <= 99:
            raise ConfigError(f"{prefix}.ns_steps",
                              f"got {self.ns_steps}; allowed: an integer, 1 <= ns_steps <= 99")
        require_in(f"{prefix}.adjust_lr_fn", self.adjust_lr_fn, ADJUST_LR_FNS)
        self.adamw.validate(f"{prefix}.adamw")

    def group_options(self, kind: str) -> dict:
        muon = kind in MUON_KINDS
        options = {"muon": muon}
        if kind in self.no_decay:
            options["weight_decay"] = 0.0
        elif not muon:
            options["weight_decay"] = self.adamw.weight_decay
        if not muon:
            options["base_lr"] = self.adamw.lr
        return options

    def build(self, groups, device):
        muon_groups = [_without_flag(g) for g in groups if g["muon"]]
        adamw_groups = [_without_flag(g) for g in groups if not g["muon"]]
        muon = torch.optim.Muon(muon_groups, lr=self.lr, weight_decay=self.weight_decay,
                                momentum=self.momentum, nesterov=self.nesterov,
                                ns_steps=self.ns_steps, adjust_lr_fn=self.adjust_lr_fn)
        adamw = torch.optim.AdamW(adamw_groups, lr=self.adamw.lr, betas=tuple(self.adamw.betas),
                                  eps=self.adamw.eps, weight_decay=self.adamw.weight_decay,
                                  **kernel_options(torch.optim.AdamW, device))
        return MuonAdamW(muon, adamw)


def _without_flag(group: dict) -> dict:
    return {key: value for key, value in group.items() if key != "muon"}
