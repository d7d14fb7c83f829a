"""Gradient clipping (docs/optimizers.md), applied once per update to the complete
(unscaled) gradients.

A clipper is built from the model (`ClipConfig.build(model)`, so that it can tell biases and
norms apart) and called once per update with the parameters that have gradients; it
clips their `.grad` in place and returns two 0-dim tensors on their device:

- the pre-clip global L2 norm of all gradients together (`train/grad_norm`; always L2,
  whatever `norm_type` the clipper measures with), and
- the coefficient it applied (`train/clip_coef`): the factor every gradient was multiplied
  by for `none`, `norm` and `adaptive`; for the clippers that act element- or row-wise
  (`norm` with `per_param`, `value`, `agc`) the ratio ‖clipped‖₂ / ‖g‖₂, and 1 when g = 0.

Nothing here reads a value back to the host (no `.item()`, no branching on tensor values),
so clipping adds no host-device synchronization. Clippers with history keep it in
state_dict(), as plain tensors and numbers (readable with torch.load(weights_only=True)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.models import KINDS, parameter_kinds
from trainrun.registry import options_of, register

Tensors = list[torch.Tensor]
Params = list[torch.nn.Parameter]


def global_norm(grads: Tensors, norm_type: float = 2.0) -> torch.Tensor:
    """‖g‖ over all gradients together, with one foreach kernel for the per-tensor norms."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, norm_type)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def norm_ratio(post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """‖clipped‖ / ‖g‖, and 1 where g = 0 (computed on the device, no sync)."""
    return torch.where(pre > 0, post / pre, torch.ones_like(pre))


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


@register("clip", "none")
@dataclass
class NoClipConfig(ClipConfig):
    def build(self, model):
        return NoClip()


class NoClip(Clipper):
    def __call__(self, params):
        norm = global_norm([p.grad for p in params])
        return norm, torch.ones_like(norm)


@register("clip", "norm")
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
            torch._foreach_mul_(grads, [self.max_norm / n.clamp(min=self.max_norm) for n in norms])
            return pre, norm_ratio(global_norm(grads), pre)
        norm = pre if self.norm_type == 2 else global_norm(grads, self.norm_type)
        coef = self.max_norm / norm.clamp(min=self.max_norm)
        torch._foreach_mul_(grads, coef)
        return pre, coef


@register("clip", "value")
@dataclass
class ValueClipConfig(ClipConfig):
    """Each gradient element clamped to [−max_value, max_value]."""

    max_value: float = MISSING

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.max_value", self.max_value)

    def build(self, model):
        return ValueClip(self.max_value)


class ValueClip(Clipper):
    def __init__(self, max_value: float):
        self.max_value = max_value

    def __call__(self, params):
        grads = [p.grad for p in params]
        pre = global_norm(grads)
        if not grads:
            return pre, torch.ones_like(pre)
        torch._foreach_clamp_min_(grads, -self.max_value)
        torch._foreach_clamp_max_(grads, self.max_value)
        return pre, norm_ratio(global_norm(grads), pre)


@register("clip", "adaptive")
@dataclass
class AdaptiveClipConfig(ClipConfig):
    """AutoClip (Seetharaman et al. 2020): clip the global L2 norm at the `percentile`-th
    percentile of the last `window` pre-clip norms, the current one included."""

    percentile: float = MISSING  # in (0, 100]
    window: int = MISSING  # norms remembered (>= 1)

    def validate(self, prefix: str) -> None:
        if not (math.isfinite(self.percentile) and 0 < self.percentile <= 100):
            raise ConfigError(f"{prefix}.percentile",
                              f"got {self.percentile}; allowed: 0 < percentile <= 100")
        require_positive(f"{prefix}.window", self.window)
        if self.window > 10**7:  # the norms are held in memory
            raise ConfigError(f"{prefix}.window", f"got {self.window}; allowed: 1 <= window "
                                                  f"<= 10000000")

    def build(self, model):
        return AutoClip(self.percentile, self.window)


class AutoClip(Clipper):
    """g ← g · t / max(‖g‖, t), t = the percentile of the remembered norms.

    Each update first appends its pre-clip global L2 norm to the history (a ring buffer of
    `window` norms on the gradients' device, plus a count), then takes t as the percentile
    with linear interpolation (numpy.percentile's default, torch.quantile's `linear`) over
    the min(count, window) norms it holds, so the current norm is always included, as in the
    paper's reference code. While fewer than `window` norms exist, t is the percentile of
    those that do: the first update is never clipped (t = its own norm). A non-finite norm
    (an update about to be skipped) is not added to the history.
    """

    def __init__(self, percentile: float, window: int):
        self.q, self.window = percentile / 100, window
        self.history = torch.zeros(window)  # pre-clip norms; slot = count % window
        self.count = torch.zeros((), dtype=torch.long)  # finite norms added so far

    def __call__(self, params):
        grads = [p.grad for p in params]
        norm = global_norm(grads).float()
        if self.history.device != norm.device:
            self.history, self.count = self.history.to(norm.device), self.count.to(norm.device)
        slots = torch.arange(self.window, device=norm.device)
        finite = torch.isfinite(norm)
        self.history = torch.where((slots == self.count % self.window) & finite, norm,
                                   self.history)
        self.count = self.count + finite.long()
        threshold = self.threshold()
        coef = torch.where(norm > threshold, threshold / norm, torch.ones_like(norm))
        if grads:
            torch._foreach_mul_(grads, coef)
        return norm, coef

    def threshold(self) -> torch.Tensor:
        """The percentile of the norms held (+inf while there are none), on the device."""
        held = self.count.clamp(max=self.window)
        slots = torch.arange(self.window, device=held.device)
        ordered = torch.sort(torch.where(slots < held, self.history, math.inf)).values
        position = self.q * (held - 1).clamp(min=0).to(ordered.dtype)
        low = position.floor().long()
        high = torch.minimum(low + 1, (held - 1).clamp(min=0))
        lo, hi = ordered.gather(0, torch.stack([low, high])).unbind()
        value = lo + (hi - lo) * (position - low)
        return torch.where(held > 0, value, torch.full_like(value, math.inf))

    def state_dict(self) -> dict:
        return {"history": self.history.detach().cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Exact when the window is unchanged; else keeps the newest norms that fit."""
        if not state:  # a checkpoint written under another clip mode
            return
        device = self.history.device
        history, count = state["history"].float(), int(state["count"])
        if history.numel() != self.window:
            held = min(count, history.numel())
            order = (count - held + torch.arange(held)) % history.numel()  # oldest first
            newest = history[order][-self.window:]
            history = torch.zeros(self.window)
            history[: newest.numel()] = newest
            count = newest.numel()
        self.history = history.to(device).clone()
        self.count = torch.tensor(count, dtype=torch.long, device=device)


@register("clip", "agc")
@dataclass
class AGCConfig(ClipConfig):
    """Adaptive gradient clipping (Brock et al. 2021), unit by unit: ‖G_i‖ ≤ clipping ·
    max(‖W_i‖, eps), where a unit i is an output row (norms over every dim but the first;
    a whole tensor for vectors). Parameters of the kinds in `exclude` are left alone."""

    clipping: float = MISSING  # λ
    eps: float = MISSING  # floor on ‖W_i‖, so that zero-initialized units can move
    exclude: list[str] = MISSING  # parameter kinds not clipped: bias, norm, embedding, weight

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.clipping", self.clipping)
        require_positive(f"{prefix}.eps", self.eps)
        for kind in self.exclude:
            require_in(f"{prefix}.exclude", kind, KINDS)

    def build(self, model):
        kinds = parameter_kinds(model)
        skip = {id(p) for name, p in model.named_parameters() if kinds[name] in self.exclude}
        return AGC(self.clipping, self.eps, skip)


class AGC(Clipper):
    def __init__(self, clipping: float, eps: float, skip: set[int]):
        self.clipping, self.eps, self.skip = clipping, eps, skip

    def __call__(self, params):
        grads = [p.grad for p in params]
        pre = global_norm(grads)
        for p in params:  # one pass per tensor; the work inside is vectorized
            if id(p) in self.skip:
                continue
            dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
            w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
            g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
            limit = self.clipping * w_norm.clamp(min=self.eps)
            p.grad.mul_(torch.where(g_norm > limit, limit / g_norm, torch.ones_like(g_norm)))
        return pre, norm_ratio(global_norm(grads), pre)


CLIPPERS: dict[str, type[ClipConfig]] = options_of("clip")  # each class registers itself
