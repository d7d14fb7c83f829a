"""What a run is made of (`Components`: the parts the loop works with, built by
trainrun.builders.build_components; the loop in trainrun.loop owns the training) and everything
a resumed run needs besides the weights (`Components.state_dict()`): optimizer, schedule, clipper, loss scaler, data position,
counters and every random-number generator."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from trainrun.clip import Clipper
from trainrun.config import TrainerConfig
from trainrun.data import Buckets, Pairs, Sequences, Tokenizer
from trainrun.data.order import DataOrder, sequences_per_update
from trainrun.distributed import ONE_PROCESS, Replicas, World
from trainrun.ema import Ema
from trainrun.precision import Precision
from trainrun.schedules import Schedule


@dataclass
class Counters:
    k: int = 0  # updates applied
    tokens: int = 0  # target tokens trained on
    skipped_updates: int = 0  # all skipped updates
    skipped_in_a_row: int = 0  # those that count towards trainer.max_skipped
    train_loss: float = math.nan  # the last one recorded
    val_loss: float = math.nan
    best_val_loss: float = math.inf
    best_val_step: int = 0  # the update that measured best_val_loss; 0: none yet
    wall_seconds: float = 0.0  # the run's training time up to its last checkpoint
    val_bleu: float = math.nan  # translation, trainer.bleu_every: the last BLEU and chrF
    val_chrf: float = math.nan
    val_loss_ema: float = math.nan  # trainer.ema_decay: the last val/loss of the average
    val_sources: dict = field(default_factory=dict)  # data=mix: name -> its last val/loss


@dataclass
class Components:
    cfg: TrainerConfig
    replicas: Replicas  # the model as the processes share it; .forward runs it
    raw_model: torch.nn.Module  # what is saved
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    clipper: Clipper
    precision: Precision
    train: Sequences | Buckets  # Buckets: translation's micro-batches (batch_size 1)
    val: Sequences | Pairs
    order: DataOrder
    batch_size: int
    device: torch.device
    counters: Counters
    world: World = ONE_PROCESS
    tokenizer: Tokenizer | None = None  # the run's, kept in its directory
    saved_world: tuple | None = None  # processes, sequences per update of a loaded checkpoint
    val_size: int = 0  # the validation set: the first val_size sequences of val (validation.py)
    val_batch_size: int = 0  # sequences (or pairs) per validation forward pass
    unit: str = "sequences"  # what an index of val is: sequences, or translation's pairs
    ema: Ema | None = None  # trainer.ema_decay: the weights' moving average (saved as weights)

    def state_dict(self) -> dict:
        """Sharded (FSDP), the optimizer's state is saved with the model's shards instead."""
        optimizer = {} if self.replicas.sharded else {"optimizer": self.optimizer.state_dict()}
        return {
            **optimizer,
            "schedule": self.schedule.state_dict(),
            "clipper": self.clipper.state_dict(),
            "scaler": self.precision.state_dict(),
            "order": self.order.state_dict(),
            "counters": asdict(self.counters),
            "rng": rng_state(self.device, self.world),
            "world_size": self.world.size,
            "sequences_per_update": self.sequences_per_update(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError (or what a component's own load raises: KeyError, TypeError,
        RuntimeError, ...) when `state` is not one that a trainer of this config writes."""
        check_like(state, self.state_dict())
        if "optimizer" in state:  # else loaded with the shards (checkpoint.load)
            self.optimizer.load_state_dict(state["optimizer"])
            check_optimizer_state(self.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        self.clipper.load_state_dict(state["clipper"])
        self.precision.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["order"])
        self.counters = Counters(**state["counters"])
        set_rng_state(state["rng"], self.device, self.world)
        self.saved_world = (state.get("world_size", 1), state.get("sequences_per_update"))

    def sequences_per_update(self) -> int:
        return sequences_per_update(self.batch_size, self.cfg.grad_accum_steps, self.world.size)

    def resume_notes(self) -> list[str]:
        """What a resume on another number of processes changes, and what it does not; what
        a mixture's new weights change."""
        notes = list(getattr(self.order, "notes", []))
        if self.saved_world is None or self.saved_world[0] == self.world.size:
            return notes
        processes, sequences = self.saved_world
        return [f"the checkpoint was written by {processes} process(es) with updates of "
                f"{sequences} sequences; this run has {self.world.size}, with updates of "
                f"{self.sequences_per_update()}: the data order continues where it stopped (it "
                f"does not depend on the number of processes)", *notes]


LIKE = {("float", "int"), ("bool", "null")}  # (written, read) kinds that check_like takes


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of {value.dtype}"
    if isinstance(value, (list, tuple)):
        return "list"
    return "null" if value is None else type(value).__name__


def check_like(saved, template, where: str = "state") -> None:
    """`saved` holds values of the kinds that `template` (this trainer's own state_dict())
    holds, wherever both have one: a dict where it has a dict, a float (or int) where it has
    a float, a tensor of the same dtype, and so on; null in the template stands for anything,
    and null for a flag (the optimizer's fused and foreach: set on the device that saved).
    Entries only one of them has are left to the components (an older checkpoint, another
    clip= or precision= on resume). Raises ValueError naming the first that differs."""
    kind, expected = _kind(saved), _kind(template)
    if expected != "null" and kind != expected and (expected, kind) not in LIKE:
        raise ValueError(f"{where}: {kind} where trainrun writes {expected}")
    if isinstance(template, dict):
        for key in template.keys() & saved.keys():
            check_like(saved[key], template[key], f"{where}.{key}")
    elif expected == "list":
        for i, (item, like) in enumerate(zip(saved, template, strict=False)):
            check_like(item, like, f"{where}[{i}]")


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Each loaded state tensor fits its parameter: of its shape, a scalar, or (Adafactor's
    factored moments) a shape that broadcasts to it. Raises ValueError otherwise, rather
    than fail at the first update with the run directory already written."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            fits = not isinstance(value, torch.Tensor)
            if not fits:
                try:
                    fits = torch.broadcast_shapes(value.shape, param.shape) == param.shape
                except RuntimeError:
                    fits = False
            if not fits:
                raise ValueError(f"optimizer state {name!r} of shape {tuple(value.shape)} for a "
                                 f"parameter of shape {tuple(param.shape)}")


def rng_state(device: torch.device, world: World = ONE_PROCESS) -> dict:
    """Python's, NumPy's and torch's generators, and each rank's own GPU's ("cuda", in rank
    order: every rank calls this, the states are gathered), as tensors and plain values so
    that torch.load(weights_only=True) can read them back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": gathered(torch.cuda.get_rng_state(device), world)
        if device.type == "cuda" else [],
    }


def gathered(value: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's `value`, in rank order."""
    if world.size == 1:
        return [value]
    import torch.distributed as dist

    found: list = [None] * world.size
    dist.all_gather_object(found, value)
    return found


def own(saved: list, rank: int):
    """Rank `rank`'s entry of a per-rank list saved by any number of ranks: its own, or on
    a resume with more ranks than wrote it, that of rank mod their number (a resume on
    another number of processes is not bit-exact anyway: the data are split otherwise);
    None if nothing was saved."""
    return saved[rank % len(saved)] if saved else None


def set_rng_state(state: dict, device: torch.device, world: World = ONE_PROCESS) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = own(state["cuda"], world.rank)
    if device.type == "cuda" and cuda is not None:  # this rank's GPU alone
        torch.cuda.set_rng_state(cuda, device)
