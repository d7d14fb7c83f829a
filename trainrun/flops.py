"""Model FLOPs utilization (MFU): the share of the GPU's dense peak that training uses,
counted with the model family's `flops_per_token` (PaLM's appendix: 6 per weight that
computes plus attention's) at the tokens/s trained. trainrun's `train/mfu` and
scripts/bench.py both use it (docs/performance.md).

MFU = tokens/s × FLOPs per token / (peak FLOP/s × processes). None off CUDA, and on a GPU
this table does not know: a guessed peak would be a figure that misleads.
"""

from __future__ import annotations

import torch

# Dense peak FLOP/s by GPU and precision (NVIDIA's data sheets, no sparsity), the first
# part whose words all appear in the device's name: the PCIe and NVL parts run slower
# clocks than the SXM ones. fp32 runs its matmuls on TF32 tensor cores (trainrun allows
# TF32 on CUDA).
PEAKS = {
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 378e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12},  # SXM
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "fp32": 417.5e12},
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},  # SXM and PCIe alike
}


def peak_of(name: str, mode: str) -> float | None:
    """The peak of the GPU called `name` (as torch.cuda.get_device_name says) in precision
    `mode` (bf16, fp16, fp32), or None for a GPU not in PEAKS."""
    words = name.replace("-", " ").split()
    return next((p[mode] for gpu, p in PEAKS.items() if all(w in words for w in gpu.split())),
                None)


def peak_flops(device: torch.device, mode: str) -> float | None:
    """The peak of one `device` in `mode`; None off CUDA or for an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_of(torch.cuda.get_device_name(device), mode)


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None,
        processes: int = 1) -> float | None:
    """The fraction (0.42, not 42) of `processes` devices' `peak` FLOP/s that training
    `tokens_per_sec` (all processes' tokens) at `flops_per_token` uses; None without a peak."""
    if not peak:
        return None
    return tokens_per_sec * flops_per_token / (peak * processes)
