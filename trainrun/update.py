"""One optimizer update: micro-batches, autocast, loss scaling, clipping, step.

The loss of an update is the mean over every target token of all its micro-batches (SPEC
§5): each micro-batch contributes sum(token losses) / n_targets, where n_targets counts the
whole window, so accumulating k micro-batches of b sequences equals one batch of k·b
sequences whatever the sequences' lengths. n_targets is known on the host before the first
forward pass (it comes from the data, not from the device), so normalizing costs no sync;
under DDP every rank knows the whole window, so it needs no all-reduce either.

An update whose loss or gradients are not finite is skipped (SPEC §5): the optimizer does
not step, and the caller neither advances k nor the schedule. Deciding that costs one
host read per update, the only one in the hot path: the next update's lr depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainrun.clip import Clipper
from trainrun.data import IGNORE
from trainrun.precision import Precision


@dataclass
class UpdateResult:
    loss: torch.Tensor  # token-mean training loss of the update (0-dim, on the device)
    grad_norm: torch.Tensor  # pre-clip global L2 norm of the gradients
    clip_coef: torch.Tensor  # the coefficient the clipper applied
    stepped: bool  # False: skipped for non-finite gradients, nothing was changed


def loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the targets that are not IGNORE, computed in fp32."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def train_update(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 n_targets: int, optimizer: torch.optim.Optimizer, clipper: Clipper,
                 precision: Precision, device: torch.device) -> UpdateResult:
    """Apply one update from `batches` (CPU tensors), normalized by `n_targets` tokens."""
    total = torch.zeros((), device=device)
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with precision.autocast():
            loss = loss_sum(model, x, y) / n_targets
        precision.scale(loss).backward()
        total += loss.detach()
    precision.unscale_(optimizer)  # clipping sees the true gradients
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None]
    grad_norm, clip_coef = clipper(params)
    stepped = precision.step(optimizer, torch.isfinite(total) & torch.isfinite(grad_norm))
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(total, grad_norm, clip_coef, stepped)
