"""Gradient clipping (SPEC §5), applied once per update to the complete (unscaled) gradients.

A clipper is built from the model (`ClipConfig.build(model)`, so that it can tell biases and
norms apart) and called once per update with the parameters that have gradients; it
clips their `.grad` in place and returns two 0-dim tensors on their device, the
pre-clip global L2 norm (`train/grad_norm`) and the coefficient it applied
(`train/clip_coef`); nothing here reads a value back to the host, so clipping adds no
host-device synchronization. Clippers with history keep it in state_dict().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive

Tensors = list[torch.Tensor]
Params = list[torch.nn.Parameter]


def global_norm(grads: Tensors, norm_type: float = 2.0) -> torch.Tensor:
    """‖g‖ over all gradients together, with one foreach kernel for the per-tensor norms."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, norm_type)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


@dataclass
class ClipConfig:
    def validate(self, prefix: str) -> None:
        pass

    def build(self, model: torch.nn.Module) -> Clipper:
        raise NotImplementedError


class Clipper:
    def __call__(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the gradients of `params` in place; return (pre-clip global L2 norm, coef)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class NoClipConfig(ClipConfig):
    def build(self, model):
        return NoClip()


class NoClip(Clipper):
    def __call__(self, params):
        norm = global_norm([p.grad for p in params])
        return norm, torch.ones_like(norm)


@dataclass
class NormClipConfig(ClipConfig):
    """g ← g · max_norm / max(‖g‖, max_norm), globally or (per_param) tensor by tensor."""

    max_norm: float = MISSING
    norm_type: float = MISSING  # 1, 2 or inf
    per_param: bool = MISSING

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.max_norm", self.max_norm)
        if self.norm_type not in (1, 2, math.inf):
            raise ConfigError(f"{prefix}.norm_type", f"got {self.norm_type}; allowed: 1, 2, inf")

    def build(self, model):
        return NormClip(self.max_norm, float(self.norm_type), self.per_param)


class NormClip(Clipper):
    def __init__(self, max_norm: float, norm_type: float, per_param: bool):
        self.max_norm, self.norm_type, self.per_param = max_norm, norm_type, per_param

    def __call__(self, params):
        grads = [p.grad for p in params]
        pre = global_norm(grads)
        if not grads:
            return pre, torch.ones_like(pre)
        if self.per_param:
            norms = torch._foreach_norm(grads, self.norm_type)
            coefs = [self.max_norm / n.clamp(min=self.max_norm) for n in norms]
            torch._foreach_mul_(grads, coefs)
            # the coefficient the whole gradient saw: ‖clipped‖ / ‖g‖ (1 when g = 0)
            post = global_norm(grads)
            return pre, torch.where(pre > 0, post / pre, torch.ones_like(pre))
        norm = pre if self.norm_type == 2 else global_norm(grads, self.norm_type)
        coef = self.max_norm / norm.clamp(min=self.max_norm)
        torch._foreach_mul_(grads, coef)
        return pre, coef


CLIPPERS = {"none": NoClipConfig, "norm": NormClipConfig}
