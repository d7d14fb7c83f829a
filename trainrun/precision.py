"""Precision policy (docs/precision.md): fp32; bf16 autocast; fp16 autocast with dynamic loss
scaling; auto picks bf16 on a GPU that supports it, fp16 on one that does not, fp32 on CPU.
fp16 and bf16 also run on the CPU through torch's CPU autocast and GradScaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive
from trainrun.registry import options_of, register


@dataclass
class PrecisionConfig:
    def validate(self, prefix: str) -> None:
        pass

    def mode(self, device: torch.device) -> str:
        """fp32, bf16 or fp16 on this device."""
        raise NotImplementedError


@register("precision", "fp32")
@dataclass
class FP32Config(PrecisionConfig):
    def mode(self, device):
        return "fp32"


@register("precision", "bf16")
@dataclass
class BF16Config(PrecisionConfig):
    def mode(self, device):
        return "bf16"


FLOAT32_MAX = torch.finfo(torch.float32).max


@register("precision", "fp16")
@dataclass
class FP16Config(PrecisionConfig):
    """Dynamic loss scaling, with torch.amp.GradScaler's parameter names."""

    init_scale: float = MISSING
    growth_factor: float = MISSING
    backoff_factor: float = MISSING
    growth_interval: int = MISSING

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.init_scale", self.init_scale)
        require_positive(f"{prefix}.growth_interval", self.growth_interval)
        if not 1 < self.growth_factor <= FLOAT32_MAX:
            raise ConfigError(f"{prefix}.growth_factor",
                              f"got {self.growth_factor}; allowed: 1 < growth_factor <= "
                              f"{FLOAT32_MAX:.4g} (float32)")
        if self.init_scale > FLOAT32_MAX:  # the scaler holds it in a float32 tensor
            raise ConfigError(f"{prefix}.init_scale",
                              f"got {self.init_scale}; allowed: 0 < init_scale <= "
                              f"{FLOAT32_MAX:.4g} (float32); 65536 is usual")
        if self.growth_interval >= 2**31:
            raise ConfigError(f"{prefix}.growth_interval",
                              f"got {self.growth_interval}; allowed: 1 <= growth_interval < 2**31")
        if not 0 < self.backoff_factor < 1:
            raise ConfigError(f"{prefix}.backoff_factor",
                              f"got {self.backoff_factor}; allowed: 0 < backoff_factor < 1")

    def mode(self, device):
        return "fp16"


@register("precision", "auto")
@dataclass
class AutoConfig(FP16Config):
    """bf16 on a GPU with bfloat16, fp16 (with these scaler keys) on one without, fp32 on CPU."""

    def mode(self, device):
        if device.type != "cuda":
            return "fp32"
        # bfloat16 in hardware (Ampere on): torch also says yes for GPUs that only emulate
        # it, many times slower than their fp16
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp16"


PRECISIONS: dict[str, type[PrecisionConfig]] = options_of("precision")  # each class registers itself
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast for the forward pass and, under fp16, the loss scaler.

    `scale(loss)` before backward; `unscale_(optimizer)` before clipping; `step(optimizer,
    finite)` applies the update unless the gradients are not finite.
    """

    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        self.mode = cfg.mode(device)
        self.device = device
        self.dtype = DTYPES[self.mode]
        if self.mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision", "bf16 was asked for on a GPU without bfloat16 support; "
                                           "allowed here: fp16, fp32, auto")
        if self.mode == "fp32" and device.type == "cuda":
            # fp32 matmuls on TF32 tensor cores (10-bit mantissa products, fp32 sums)
            torch.set_float32_matmul_precision("high")
        self.scaler = None
        if self.mode == "fp16":
            self.scaler = torch.amp.GradScaler(
                device.type, init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval,
            )

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def may_step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> torch.Tensor:
        """Whether the update may step, on the device (nothing is read here): fp32/bf16
        when `finite` (loss and gradient norm); fp16 when the scaler's unscale_() found no
        inf or NaN in the gradients (the scaler decides, as its own step() would)."""
        found = list(self.scaler._found_inf_per_device(optimizer).values()) \
            if self.scaler is not None else []
        if not found:  # fp32/bf16 (or no gradient at all)
            return finite
        return torch.stack([f.to(finite.device) for f in found]).sum() == 0

    def step(self, optimizer: torch.optim.Optimizer, may: bool) -> bool:
        """Step if `may` (may_step(), read by the caller); return whether it stepped. fp16:
        the gradients are unscaled already, so the optimizer steps as it would without a
        scaler (fused ones too: no inf to skip inside their kernel), and the scaler then
        updates its scale from what unscale_() found, on the device."""
        if may:
            optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        return may

    def loss_scale(self) -> torch.Tensor | None:
        """The current loss scale as a device tensor (None without a scaler)."""
        return self.scaler._scale if self.scaler else None

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
