"""More than one process (docs/distributed.md): the process group, and how the model's gradients are
shared between processes. The loop calls what is here; it never branches on the strategy.

The process group is made from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or, under SLURM's srun without torchrun, from
SLURM's own variables. Gloo on CPU, NCCL on CUDA, one device per local rank.

Every rank sees its share of each update's window of the data order (order.micro_batches)
and normalizes its loss by the target-token count of the whole window, so the gradients
are *summed* across ranks, never averaged: N processes with micro-batch b then compute
exactly the update of one process with micro-batch N·b. They are summed once per update,
on the last micro-batch (DDP's no_sync, FSDP's requires_gradient_sync on the others).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainrun import devices
from trainrun.errors import NotTrainrun, reason
from trainrun.ranks import slurm_environment
from trainrun.signals import STOP_SIGNALS

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and the console."""
        return self.rank == 0


ONE_PROCESS = World()
_world = ONE_PROCESS


def init(device: torch.device) -> World:
    """Join the process group if this process is one of several (torchrun or srun), with
    the backend of the run's device (trainrun.devices); a no-op for a single process.
    Called once, before anything else is built."""
    global _world
    os.environ.update(slurm_environment(dict(os.environ)))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(devices.backend(device), timeout=timedelta(minutes=30))
    _world = World(dist.get_rank(), local_rank, dist.get_world_size())
    return _world


def init_single(device: torch.device) -> World:
    """A process group of one, for FSDP in a process that torchrun did not start."""
    global _world
    if not dist.is_initialized():
        dist.init_process_group(devices.backend(device), store=dist.HashStore(), rank=0,
                                world_size=1)
        _world = World(0, 0, 1)
    return _world


def close() -> None:
    """Leave the process group (at the end of a run): its threads end before the
    interpreter does."""
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = ONE_PROCESS


def current() -> World:
    return _world


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(obj):
    """Rank 0's obj on every rank (pickled, host side: small values only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Replicas:
    """The model as the processes share it: `module` is what runs forward. Strategy "ddp"
    is plain data parallelism (the model itself when there is one process); "fsdp" shards
    parameters, gradients and optimizer state with FSDP2's fully_shard. `forward` is the
    module compiled with torch.compile when `compile`, else the module itself."""

    def __init__(self, model: torch.nn.Module, strategy: str = "ddp",
                 world: World = ONE_PROCESS, device: torch.device | None = None,
                 compile: bool = False):
        self.strategy, self.world = strategy, world
        self.sharded = strategy == "fsdp"
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import FSDPModule, fully_shard

            # the mesh of the run's device: without one, FSDP takes the accelerator's and
            # moves a CPU run's parameters to the GPU
            mesh = init_device_mesh(device.type if device is not None else "cpu",
                                    (world.size,))
            for unit in model.shard_units():  # the family's blocks
                fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)
            for unit in (m for m in model.modules() if isinstance(m, FSDPModule)):
                unit.set_gradient_divide_factor(1.0)  # summed, not averaged (module docstring)
                unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
            self.module = model
        elif world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device is not None and device.type == "cuda" else None
            # broadcast_buffers=False: the buffers are constants (the padding mask, rotary tables)
            self.module = DistributedDataParallel(model, device_ids=ids,
                                                  broadcast_buffers=False)
            self.module.register_comm_hook(None, _sum_hook)
        else:
            self.module = model
        self.forward = torch.compile(self.module) if compile else self.module

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are reduced
        across ranks on the update's last micro-batch only."""
        if self.sharded:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.world.size > 1 and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """value summed over the ranks."""
        if self.world.size > 1:
            dist.all_reduce(value)
        return value

    def agree(self, loss: torch.Tensor, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The update's loss summed over ranks, and per stop signal how many ranks were
        asked to stop by it (`stop`: this rank's, 0 for none), in one all-reduce and on the
        device: the caller reads the counts with its one read of the update (stop_of), so
        every rank decides to skip or stop identically, and all report and exit with the
        signal that was really sent. One process: no counts (an empty tensor)."""
        if self.world.size == 1:
            return loss, loss.new_zeros(0)
        asked = loss.new_zeros(len(STOP_SIGNALS))  # made on the device: no copy from the host
        if stop:
            asked[STOP_SIGNALS.index(stop)] = 1.0
        both = torch.cat([loss.reshape(1), asked])
        dist.all_reduce(both)
        return both[0], both[1:]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        barrier()

    def stop_of(self, counts: list[float], stop: int) -> int:
        """The stop signal some rank was asked to stop by, from agree()'s counts as read;
        one process: its own."""
        if self.world.size == 1:
            return stop
        return next((s for s, n in zip(STOP_SIGNALS, counts, strict=True) if n), 0)


    # FSDP's checkpoints (trainrun.checkpoint): torch.distributed.checkpoint writes each
    # rank's shards, and reads them back on any number of ranks

    def sharded_state(self, optimizer: torch.optim.Optimizer, ema=None) -> dict:
        """The model's and optimizer's state as sharded tensors, keyed by parameter name;
        with `ema` (trainrun.ema.Ema) its average too, as views of its shards."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, optimizer)
        average = {} if ema is None else {"ema": ema.sharded_state()}
        return {"model": model, "optimizer": optim, **average}

    def load_sharded(self, path, optimizer: torch.optim.Optimizer, ema=None) -> None:
        """Read a sharded checkpoint written by any number of ranks into this one's shards
        (`ema`: the average's too, in place), unpickling nothing but DCP's own index
        (trainrun.sharded); NotTrainrun if its files are not the shards of this model and
        optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from trainrun import sharded

        state = self.sharded_state(optimizer, ema)
        try:
            dcp.load(state, storage_reader=sharded.Reader(path), planner=sharded.Planner())
        except CheckpointException as error:  # DCP's wrapper of every rank's failure
            cause = next(iter(error.failures.values()))[0]
            raise NotTrainrun(str(cause) if isinstance(cause, NotTrainrun) else
                              f"{path}: not the shards of this model ({reason(cause)})") \
                from None
        set_state_dict(self.module, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's host ({} on the other ranks), each tied
        parameter under one name: the one safetensors' save_model keeps (the first in
        sorted order), so the file reads like an unsharded run's."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return one_name_per_tensor(self.module, full)


def one_name_per_tensor(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict:
    """`weights` (the module's, by name) with each tied parameter under one name: the one
    safetensors' save_model keeps, the first in sorted order."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for aliases in names.values():
        for alias in sorted(aliases)[1:]:
            weights.pop(alias, None)
    return weights


def _sum_hook(state, bucket):  # unannotated: DDP checks annotations, and these are strings
    """DDP's all-reduce of a GradBucket without its division by the world size."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value made whole on every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
