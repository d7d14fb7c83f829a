"""This process's place in its launch, as torchrun or SLURM's srun tells it through the
environment, known before the process group is made (trainrun.distributed makes it):
how many processes, this one's rank, and the variables torchrun would have set, derived
from SLURM's for the tasks of an srun step."""

from __future__ import annotations

import os
import re


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torchrun's variables derived from SLURM's, for the tasks of an srun step (a shell or
    batch script inside an allocation is not one: it has no SLURM_STEP_ID); {} when
    torchrun's are set or SLURM's are not. The rendezvous host is the first node of the
    step, the port one derived from the job id unless MASTER_PORT is given."""
    if "WORLD_SIZE" in env or not {"SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"} <= env.keys():
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or \
        env.get("SLURM_NODELIST") or "127.0.0.1"
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def launch_size(env: dict[str, str] | None = None) -> int:
    """How many processes this launch has (torchrun's WORLD_SIZE, or the tasks of an srun
    step), known before the process group is made."""
    env = dict(os.environ if env is None else env)
    return int(env.get("WORLD_SIZE") or slurm_environment(env).get("WORLD_SIZE", "1"))


def launch_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank in its launch (torchrun's RANK, or srun's task), known before
    the process group is made; 0 for a single process."""
    env = dict(os.environ if env is None else env)
    return int(env.get("RANK") or slurm_environment(env).get("RANK", "0"))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,07],cpu1" -> "gpu03"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        return nodelist
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]
