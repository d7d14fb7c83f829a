"""The training loop: `fit()` runs updates k = 1..max_steps, validating and saving on
their cadences. The components live in `Trainer`, whose state_dict() is everything a
resumed run needs besides the weights."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trainrun import checkpoint
from trainrun.clip import Clipper
from trainrun.config import TrainerConfig
from trainrun.console import Console
from trainrun.data import Sequences
from trainrun.metrics import Metrics
from trainrun.order import DataOrder, micro_batches
from trainrun.precision import Precision
from trainrun.schedules import Schedule
from trainrun.update import loss_sum, train_update


@dataclass
class Counters:
    k: int = 0  # updates applied
    tokens: int = 0  # target tokens trained on
    skipped_updates: int = 0
    val_loss: float = math.nan
    best_val_loss: float = math.inf


@dataclass
class Trainer:
    cfg: TrainerConfig
    model: torch.nn.Module  # what runs forward (compiled when trainer.compile)
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

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "clipper": self.clipper.state_dict(),
            "scaler": self.precision.state_dict(),
            "order": self.order.state_dict(),
            "counters": asdict(self.counters),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.clipper.load_state_dict(state["clipper"])
        self.precision.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["order"])
        self.counters = Counters(**state["counters"])
        set_rng_state(state["rng"])


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


@torch.no_grad()
def evaluate(t: Trainer, n_batches: int) -> float:
    """Token-mean loss over the first n_batches micro-batches of the validation split."""
    t.model.eval()
    total, count = torch.zeros((), device=t.device), 0
    n = min(len(t.val), n_batches * t.batch_size)
    for start in range(0, n, t.batch_size):
        idx = np.arange(start, min(start + t.batch_size, n))
        x, y = t.val.batch(idx)
        with t.precision.autocast():
            total += loss_sum(t.model, x.to(t.device), y.to(t.device))
        count += t.val.num_targets(idx)
    t.model.train()
    return (total / count).item()


def fit(t: Trainer, metrics: Metrics, console: Console, ckpt_root: Path, meta: dict) -> dict:
    """Run updates until k = max_steps; return the summary for metrics.json."""
    cfg, c = t.cfg, t.counters
    window = t.batch_size * cfg.grad_accum_steps
    console.start_progress(cfg.max_steps, c.k)
    started, start_tokens = time.perf_counter(), c.tokens
    t.model.train()
    while c.k < cfg.max_steps:
        k = c.k + 1
        lr = t.schedule.apply(t.optimizer, k)
        indices = t.order.next_window(window)
        batches = [t.train.batch(ix) for ix in micro_batches(indices, t.batch_size)]
        n_targets = t.train.num_targets(indices)
        result = train_update(t.model, batches, n_targets, t.optimizer, t.clipper,
                              t.precision, t.device)
        c.k, c.tokens = k, c.tokens + n_targets
        metrics.update(k, lr, result, n_targets, t.precision.loss_scale(), c.skipped_updates)
        if k % cfg.eval_every == 0 or k == cfg.max_steps:
            eval_start = time.perf_counter()
            c.val_loss = evaluate(t, cfg.eval_batches)
            c.best_val_loss = min(c.best_val_loss, c.val_loss)
            t.schedule.observe(c.val_loss)
            metrics.validation(k, c.val_loss, time.perf_counter() - eval_start)
        if k % cfg.ckpt_every == 0 or k == cfg.max_steps:
            checkpoint.save(ckpt_root, k, t.raw_model, t.state_dict(), meta, cfg.keep_last)
    seconds = time.perf_counter() - started
    return {
        "status": "completed", "steps": c.k, "tokens": c.tokens,
        "train_loss": metrics.train_loss, "val_loss": c.val_loss,
        "best_val_loss": c.best_val_loss, "skipped_updates": c.skipped_updates,
        "tokens_per_sec": (c.tokens - start_tokens) / seconds if seconds > 0 else math.nan,
    }
