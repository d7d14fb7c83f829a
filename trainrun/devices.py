"""Which device a process trains on: trainer.device on this machine, one GPU per process.

With CUDA, a process takes GPU `slot % count`, `count` being the GPUs it can see, and its
slot the local rank under torchrun or srun (a cluster that shows each task only its own
GPU has count 1), or else the number of a sweep's job: the jobs of joblib's `parallel`
preset and submitit's local one run side by side on one machine, and spread over its GPUs
instead of all taking the first. The process group's backend follows the device (NCCL for
a GPU, gloo for the CPU), never the mere presence of CUDA.
"""

from __future__ import annotations

import os

import torch

from trainrun.errors import ConfigError
from trainrun.ranks import launch_size, slurm_environment


def local_rank(env: dict[str, str] | None = None) -> int | None:
    """This process's local rank under torchrun or srun (known before the process group is
    made); None for a process that is not one of several."""
    env = dict(os.environ if env is None else env)
    if launch_size(env) <= 1:
        return None
    return int(env.get("LOCAL_RANK") or slurm_environment(env).get("LOCAL_RANK", "0"))


def slot(job: int | None = None, env: dict[str, str] | None = None) -> int:
    """The local rank of a distributed launch, else a sweep job's number, else 0."""
    rank = local_rank(env)
    return rank if rank is not None else (job or 0)


def resolve(name: str, slot: int = 0) -> torch.device:
    """trainer.device on this machine; with CUDA, GPU `slot % count`."""
    if name == "cuda" and not torch.cuda.is_available():
        hidden = " (CUDA_VISIBLE_DEVICES is empty)" if hidden_gpus() else ""
        raise ConfigError("trainer.device", f"cuda was asked for but no CUDA GPU is "
                                            f"available{hidden}; allowed here: auto, cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", slot % torch.cuda.device_count())


def hidden_gpus() -> bool:
    """CUDA_VISIBLE_DEVICES is set and empty: a launcher hid every GPU from this process."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") == ""


def backend(device: torch.device) -> str:
    """The process group's backend for a run on `device`: NCCL for the model's tensors on a
    GPU (with gloo for small host objects), gloo on the CPU."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
