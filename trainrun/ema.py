"""The exponential moving average of the weights (trainer.ema_decay; docs/long-jobs.md, EMA
of the weights): what practitioners ship rather than the last weights.

After every update k that stepped (k = 1, 2, ...; a skipped update changes nothing, so it
does not move the average either):

    ema_k = d_k · ema_{k-1} + (1 - d_k) · w_k,    ema_0 = w_0 (the weights training starts from)
    d_k   = trainer.ema_decay, or with trainer.ema_warmup min(ema_decay, (1 + k) / (10 + k))

(the warm-up of torch_ema and of timm's ModelEma: early on, when w_0 is mostly noise, the
average follows the weights closely). The average is kept in float32 beside each parameter,
on its device, and updated with one foreach lerp: no read of the device, no I/O. Under
trainer.strategy=fsdp each rank keeps the average of its own shards only, sharded as the
parameters are.

It is saved in every checkpoint as model_ema.safetensors (the whole weights, as
model.safetensors holds the raw ones; sharded, also with the shards under sharded/) and
evaluated by swapping it into the model (`swapped_in`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

WARMUP = (1, 10)  # d_k = min(ema_decay, (1 + k) / (10 + k))


def decay_at(k: int, decay: float, warmup: bool) -> float:
    """d_k of update k (1-based): trainer.ema_decay, or less early on with ema_warmup."""
    if not warmup:
        return decay
    a, b = WARMUP
    return min(decay, (a + k) / (b + k))


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of parameter p: its shard (an FSDP DTensor), or p itself."""
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


class Ema:
    """The average of `model`'s parameters (each tied one once) from their current values."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.model, self.decay, self.warmup = model, decay, warmup
        # taken now, sharded: FSDP registers whole copies on the modules while they are
        # gathered (the root's stay so after a forward pass without backward), but the
        # sharded parameters, which the optimizer steps, stay the same objects
        self.named = list(model.named_parameters())
        self.shadows = [_local(p).float().clone() for p in self.params()]

    def params(self) -> list[torch.Tensor]:
        """The parameters' local values: their shards under FSDP."""
        return [_local(p) for _, p in self.named]

    def reshard(self) -> None:
        """FSDP: free the gathered copies of the parameters, so that the next forward pass
        gathers their shards afresh (no-op otherwise)."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @torch.no_grad()
    def update(self, k: int) -> None:
        """Move the average towards the weights of update k, which stepped."""
        weights = [w if w.dtype == torch.float32 else w.float() for w in self.params()]
        torch._foreach_lerp_(self.shadows, weights, 1.0 - decay_at(k, self.decay, self.warmup))

    @torch.no_grad()
    def capture(self) -> None:
        """Take the model's current weights as the average (ones loaded into it)."""
        torch._foreach_copy_(self.shadows, self.params())

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Within: the model's parameters hold the average (rounded to their dtype, float32
        in trainrun: exactly); after: their own values again, bit for bit. In place, so that
        FSDP's sharded storage, DDP's buckets and a compiled model all see it; it costs one
        copy of the weights while within."""
        params = self.params()
        kept = [p.clone() for p in params]
        self.reshard()
        torch._foreach_copy_(params, self.shadows)
        try:
            yield
        finally:
            self.reshard()
            torch._foreach_copy_(params, kept)

    def sharded_state(self) -> dict[str, torch.Tensor]:
        """The average as DTensors sharded like the parameters, keyed by parameter name, for
        torch.distributed.checkpoint: views of the shadows, so loading fills them in place."""
        from torch.distributed.tensor import DTensor

        return {name: DTensor.from_local(shadow, p.device_mesh, p.placements, run_check=False,
                                         shape=p.shape, stride=p.stride())
                for (name, p), shadow in zip(self.named, self.shadows, strict=True)}
