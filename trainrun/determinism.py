"""trainer.deterministic: the same weights, bit for bit, from the same run on a GPU.

On the CPU, training is bit-exact run to run already. On a GPU, some backward kernels
(embedding and index_add backward, scatter) add with atomics in whatever order the threads
finish, so the last bits differ from run to run; cuBLAS does the same with several
workspaces. Deterministic algorithms (and one cuBLAS workspace configuration) remove that,
at some speed: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when torch first uses it, so enable()
must run before the run's first CUDA work.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # PyTorch's documented choice (or :16:8, less memory)

_before: tuple[bool, bool, bool, str | None] | None = None  # what enable() changed


def enable(on: bool) -> str | None:
    """When on: deterministic algorithms (an op without one raises an error), cuDNN without
    benchmarking, and CUBLAS_WORKSPACE_CONFIG unless already set; return the line for the
    run's log. When off, change nothing."""
    global _before
    if not on:
        return None
    if _before is None:
        _before = (torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(),
                   torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    late = "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized()
    workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    line = (f"trainer.deterministic=true: torch.use_deterministic_algorithms(True), "
            f"cudnn.benchmark=False, CUBLAS_WORKSPACE_CONFIG={workspace}")
    if late:  # a sweep's later job in the same process, a notebook
        line += ("; but CUDA was used earlier in this process, and cuBLAS keeps the workspace "
                 "it started with: for bit-exact runs, set CUBLAS_WORKSPACE_CONFIG="
                 f"{CUBLAS_WORKSPACE_CONFIG} before starting, or run each in a new process")
    return line


def restore() -> None:
    """Undo enable() at the end of a run, for a process that goes on (the tests, a notebook)."""
    global _before
    if _before is None:
        return
    algorithms, warn_only, benchmark, workspace = _before
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    _before = None


def record(device: torch.device, processes: int) -> dict:
    """What a run's bits depend on beyond its config, for each checkpoint's meta.json
    (`reproducibility`): the CPU threads torch uses, the number of processes, torch's
    version, the device (a GPU by its model) and whether deterministic algorithms are on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"threads": torch.get_num_threads(), "processes": processes,
            "torch": torch.__version__, "device": name,
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def differences(saved: dict, now: dict) -> list[str]:
    """What a resume changes of `saved` (a checkpoint's record) that makes it leave the
    uninterrupted run's bits, one line each (threads and processes are said where they are
    chosen). Deterministic algorithms matter on a GPU only."""
    notes = []
    for key, what in (("torch", "torch"), ("device", "device")):
        if key in saved and saved[key] != now[key]:
            notes.append(f"the checkpoint was trained with {what} {saved[key]}, this run has "
                         f"{now[key]}: it will not be bit-identical to an uninterrupted run")
    if (now["device"] != "cpu" and "deterministic" in saved
            and saved["deterministic"] != now["deterministic"]):
        notes.append(f"the checkpoint was trained with trainer.deterministic="
                     f"{str(saved['deterministic']).lower()}, this run has "
                     f"{str(now['deterministic']).lower()}: it will not be bit-identical to an "
                     f"uninterrupted run")
    return notes
