"""The layer-wise adaptive optimizers implemented in the project: LARS and LAMB
(docs/optimizers.md).

Both scale the step of each parameter tensor (a "layer") by a trust ratio of norms. They are
torch.optim.Optimizer subclasses, so state_dict()/load_state_dict() are torch's, and they
work on whole lists of tensors with torch._foreach_* kernels: Python work grows with the
number of tensors, not of elements, and the per-tensor norms stay on the device (no sync).
"""

from __future__ import annotations

import math

import torch

Tensors = list[torch.Tensor]


def trust_ratio(numerator: Tensors, denominator: Tensors, scale: float = 1.0,
                extra: float = 0.0) -> Tensors:
    """scale · ‖a_i‖ / (‖b_i‖ + extra · ‖a_i‖) per tensor i, and 1 where ‖a_i‖ or ‖b_i‖ is 0."""
    a = torch.stack(torch._foreach_norm(numerator))
    b = torch.stack(torch._foreach_norm(denominator))
    ratio = scale * a / (b + extra * a)
    return list(torch.where((a > 0) & (b > 0), ratio, torch.ones_like(ratio)).unbind())


class _Layerwise(torch.optim.Optimizer):
    """step() for both: each group's parameters that have gradients go to _update()."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, [p.grad for p in params])
        return loss

    def _update(self, group: dict, params: Tensors, grads: Tensors) -> None:
        raise NotImplementedError


class LARS(_Layerwise):
    """LARS (You et al. 2017), on top of torch.optim.SGD with momentum.

    For each parameter tensor w with gradient g:

        λ = trust_coef · ‖w‖ / (‖g‖ + weight_decay · ‖w‖)    (λ = 1 when ‖w‖ or ‖g‖ is 0)
        d = λ · (g + weight_decay · w)       (d = g + weight_decay · w where lars_exclude)
        buf = d at the first step, then buf ← momentum · buf + d    (state `momentum_buffer`)
        w ← w − lr · buf

    Groups with `lars_exclude=True` (biases and norm gains, see trainrun.optimizers.standard) take
    the plain momentum step. The paper's Algorithm 1 keeps the global rate inside the
    buffer (v ← m·v + lr·λ·d, w ← w − v); this is the same update while lr is constant,
    and follows torch's SGD (lr applied after momentum) when a schedule changes it.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coef: float = 1e-3, lars_exclude: bool = False):
        if not (lr > 0 and 0 <= momentum < 1 and weight_decay >= 0 and trust_coef > 0):
            raise ValueError(f"invalid LARS hyper-parameters: lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, trust_coef={trust_coef}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coef=trust_coef, lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    def _update(self, group: dict, params: Tensors, grads: Tensors) -> None:
        wd, momentum = group["weight_decay"], group["momentum"]
        steps = torch._foreach_add(grads, params, alpha=wd) if wd else grads
        if not group["lars_exclude"]:
            steps = torch._foreach_mul(steps, trust_ratio(params, grads,
                                                          group["trust_coef"], wd))
        if momentum:
            steps = self._momentum(params, steps, momentum)
        torch._foreach_add_(params, steps, alpha=-group["lr"])

    def _momentum(self, params: Tensors, steps: Tensors, momentum: float) -> Tensors:
        """The momentum buffers after this step (new ones start as the step itself)."""
        bufs, ds = [], []
        for p, d in zip(params, steps, strict=True):
            state = self.state[p]
            if "momentum_buffer" in state:
                bufs.append(state["momentum_buffer"])
                ds.append(d)
            else:
                state["momentum_buffer"] = d.detach().clone()
        if bufs:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, ds)
        return [self.state[p]["momentum_buffer"] for p in params]


class LAMB(_Layerwise):
    """LAMB (You et al. 2019, Algorithm 2), per parameter tensor w with gradient g at its
    t-th step (t = 1, 2, ...):

        m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
        m̂ = m / (1 − β1^t)            v̂ = v / (1 − β2^t)
        r = m̂ / (√v̂ + eps) + weight_decay · w
        w ← w − lr · (‖w‖ / ‖r‖) · r    (ratio 1 when ‖w‖ or ‖r‖ is 0)

    State per tensor: `step` (an int), `exp_avg` (m), `exp_avg_sq` (v), as torch's Adam.
    The trust ratio applies to every tensor; weight decay follows the parameter groups.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        if not (lr > 0 and all(0 <= b < 1 for b in betas) and eps > 0 and weight_decay >= 0):
            raise ValueError(f"invalid LAMB hyper-parameters: lr={lr}, betas={betas}, "
                             f"eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _update(self, group: dict, params: Tensors, grads: Tensors) -> None:
        beta1, beta2 = group["betas"]
        m, v, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, group["eps"])
        r = torch._foreach_div(m, denom)
        torch._foreach_div_(r, [1 - beta1**t for t in steps])
        if group["weight_decay"]:
            torch._foreach_add_(r, params, alpha=group["weight_decay"])
        torch._foreach_mul_(r, trust_ratio(params, r))
        torch._foreach_add_(params, r, alpha=-group["lr"])
