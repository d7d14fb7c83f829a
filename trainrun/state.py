"""What a run is made of (`Trainer`) and everything a resumed run needs besides the weights
(`Trainer.state_dict()`): optimizer, schedule, clipper, loss scaler, data position,
counters and every random-number generator."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from trainrun.clip import Clipper
from trainrun.config import TrainerConfig
from trainrun.data import Sequences, Tokenizer
from trainrun.data.order import DataOrder
from trainrun.distributed import ONE_PROCESS, Replicas, World
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


@dataclass
class Trainer:
    cfg: TrainerConfig
    replicas: Replicas  # the model as the processes share it; .forward runs it
    raw_model: torch.nn.Module  # what is saved
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    clipper: Clipper
    precision: Precision
    train: Sequences
    val: Sequences
    order: DataOrder
    batch_size: int
    device: torch.device
    counters: Counters
    world: World = ONE_PROCESS
    tokenizer: Tokenizer | None = None  # the run's, kept in its directory
    saved_world: tuple | None = None  # processes, sequences per update of a loaded checkpoint

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
            "rng": rng_state(),
            "world_size": self.world.size,
            "sequences_per_update": self.sequences_per_update(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" in state:  # else loaded with the shards (checkpoint.load)
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.clipper.load_state_dict(state["clipper"])
        self.precision.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["order"])
        self.counters = Counters(**state["counters"])
        set_rng_state(state["rng"])
        self.saved_world = (state.get("world_size", 1), state.get("sequences_per_update"))

    def sequences_per_update(self) -> int:
        return self.batch_size * self.cfg.grad_accum_steps * self.world.size

    def resume_notes(self) -> list[str]:
        """What a resume on another number of processes changes, and what it does not."""
        if self.saved_world is None or self.saved_world[0] == self.world.size:
            return []
        processes, sequences = self.saved_world
        return [f"the checkpoint was written by {processes} process(es) with updates of "
                f"{sequences} sequences; this run has {self.world.size}, with updates of "
                f"{self.sequences_per_update()}: the data order continues where it stopped (it "
                f"does not depend on the number of processes)"]


def rng_state() -> dict:
    """Python's, NumPy's and torch's generators (CPU and every CUDA device), as tensors and
    plain values so that torch.load(weights_only=True) can read them back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
