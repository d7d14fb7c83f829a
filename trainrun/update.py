"""One optimizer update: micro-batches, autocast, loss scaling, clipping, step.

The loss of an update is the mean over every target token of all its micro-batches
(docs/design.md, Updates): each micro-batch contributes sum(token losses) / n_targets, where
n_targets counts the whole window, so accumulating k micro-batches of b sequences equals one
batch of k·b sequences whatever the sequences' lengths. n_targets is known on the host
before the first forward pass (it comes from the data, not from the device), so normalizing
costs no sync; under DDP every rank knows the whole window, so it needs no all-reduce
either. With more than one process, each rank trains on its share of the window and the
gradients are summed across ranks (trainrun.distributed), so the update is the one of a
single process.

An update whose loss or gradients are not finite is skipped (docs/design.md, Updates): the
optimizer does not step, and the caller neither advances k nor the schedule. Deciding that
costs one host read per update, the only one in the hot path (the next update's lr depends
on it): the flag "may step" (fp16: the loss scaler found no inf) and, with several
processes, the stop signals every rank was asked to stop by, read together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainrun.clip import Clipper
from trainrun.data import IGNORE
from trainrun.distributed import Replicas, full_tensor
from trainrun.precision import Precision


@dataclass
class UpdateResult:
    loss: torch.Tensor  # token-mean training loss of the update (0-dim, on the device)
    grad_norm: torch.Tensor  # pre-clip global L2 norm of the gradients
    clip_coef: torch.Tensor  # the coefficient the clipper applied
    stepped: bool  # False: skipped for non-finite gradients, nothing was changed
    stop: int = 0  # the signal some rank was asked to stop by (0: none): all stop after it


def loss_sum(model: torch.nn.Module, batch: tuple[torch.Tensor, ...],
             label_smoothing: float = 0.0, vocab_size: int | None = None) -> torch.Tensor:
    """Sum of the cross-entropy over the targets that are not IGNORE, computed in fp32.
    `batch` is the model's inputs and then the targets: (x, y) for a decoder, (src,
    src_lengths, tgt_in, tgt_out) for translation. With label smoothing the smoothed mass is
    spread over the vocabulary's vocab_size real ids, never the padding rows."""
    *inputs, y = batch
    logits = model(*inputs)  # (B, T, V)
    if label_smoothing:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)


def train_update(replicas: Replicas, batches: list[tuple[torch.Tensor, ...]],
                 n_targets: int, optimizer: torch.optim.Optimizer, clipper: Clipper,
                 precision: Precision, device: torch.device, stop: int = 0,
                 label_smoothing: float = 0.0, vocab_size: int | None = None) -> UpdateResult:
    """Apply one update from this rank's `batches` (CPU tensors: the model's inputs, then
    the targets), normalized by the `n_targets` tokens of the whole window (all ranks);
    `stop`: the signal this rank was asked to stop by (0: none); `label_smoothing`: the
    training loss's (trainer.label_smoothing), over the model's vocab_size real ids."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if device.type == "cuda":  # from pinned memory the copy runs beside the compute
            batch = [part.pin_memory() for part in batch]
        batch = [part.to(device, non_blocking=True) for part in batch]
        with replicas.micro_batch(last=i == len(batches) - 1):
            with precision.autocast():
                loss = loss_sum(replicas.forward, batch, label_smoothing, vocab_size) / n_targets
            precision.scale(loss).backward()
        total += loss.detach()
    total, asked = replicas.agree(total, stop)
    precision.unscale_(optimizer)  # clipping sees the true gradients
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None]
    grad_norm, clip_coef = clipper(params)
    grad_norm, clip_coef = full_tensor(grad_norm), full_tensor(clip_coef)
    may = precision.may_step(optimizer, torch.isfinite(total) & torch.isfinite(grad_norm))
    read = torch.cat([may.float().reshape(1), asked]).tolist()  # the update's one host read
    stepped = precision.step(optimizer, read[0] > 0)
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(total, grad_norm, clip_coef, stepped, replicas.stop_of(read[1:], stop))
