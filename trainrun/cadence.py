"""When the loop saves and when it stops early, beside trainer.ckpt_every and max_steps:

- trainer.ckpt_every_minutes: a checkpoint once that many minutes have passed since the
  last save (or the start), checked at every log_every-th update, so that a crash or reboot
  loses at most that much of a long run whatever its update cadence. Every process of a
  launch takes rank 0's clock (sharded saves need all of them).
- trainer.keep_best: the checkpoint of the best val/loss so far is saved when it is measured
  and kept as checkpoints/best/ (hard links to its files), apart from keep_last's pruning;
  a run that starts writing puts back a best/ that a crash left aside (recover_best).
- trainer.early_stop_patience: the run ends (completed) once that many validations in a row
  have not improved on the best val/loss. It is derived from the counters (the update of
  the best loss), so a resumed run counts as the uninterrupted one would.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from trainrun import checkpoint, faults
from trainrun.state import Components

BEST = "best"


class Cadence:
    def __init__(self, root: Path):
        self.root = root  # run_dir / "checkpoints"
        self.last_save = time.monotonic()

    def save_due(self, t: Components, k: int) -> bool:
        """Update k (just applied, validated if due) is to be checkpointed."""
        cfg = t.cfg
        if k % cfg.ckpt_every == 0 or k == cfg.max_steps:
            return True
        if cfg.keep_best and t.counters.best_val_step == k:
            return True
        if cfg.ckpt_every_minutes is None or k % cfg.log_every:
            return False
        due = time.monotonic() - self.last_save >= cfg.ckpt_every_minutes * 60
        if t.world.size > 1:  # rank 0's clock decides for all
            flag = torch.tensor(float(due and t.world.main), device=t.device)
            due = bool(t.replicas.sum(flag) > 0)
        return due

    def saved(self, t: Components, path: Path) -> None:
        """Checkpoint `path` (update t.counters.k) is complete on disk."""
        self.last_save = time.monotonic()
        if t.cfg.keep_best and t.counters.best_val_step == t.counters.k and t.world.main:
            keep_best(self.root, path)

    def patience_out(self, t: Components) -> str | None:
        """Why the run stops early, or None."""
        cfg, c = t.cfg, t.counters
        if cfg.early_stop_patience is None or c.best_val_step == 0:
            return None
        since = c.k // cfg.eval_every - c.best_val_step // cfg.eval_every
        if since < cfg.early_stop_patience or c.k % cfg.eval_every:
            return None
        return (f"early stop: val/loss has not improved for {since} validations "
                f"(trainer.early_stop_patience={cfg.early_stop_patience}); best "
                f"{c.best_val_loss:.4f} at update {c.best_val_step}")


def keep_best(root: Path, path: Path) -> None:
    """checkpoints/best/: the files of checkpoint `path`, as hard links (no second copy on
    disk; pruning `path` later leaves them), replaced by two renames: best/ to .old-best,
    then the complete copy .tmp-best to best/. A process that dies between them leaves no
    best/, and both copies: recover_best() puts one back."""
    tmp, old, best = root / f".tmp-{BEST}", root / f".old-{BEST}", root / BEST
    recover_best(root)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp, copy_function=_link)
    if best.exists():
        best.rename(old)
        faults.pause_in_keep_best()  # tests: a pause between the two renames
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)


def recover_best(root: Path) -> str | None:
    """Put checkpoints/best/ back after a process died between keep_best's two renames:
    the new copy .tmp-best when it is intact (it was complete before best/ moved aside;
    it is the checkpoint the run's counters name as best), else the old one, .old-best.
    Called before anything else of the run writes in root (checkpoint.save removes both
    copies as leftovers); returns a line saying what it did, or None."""
    best = root / BEST
    if best.exists():
        return None
    for copy in (root / f".tmp-{BEST}", root / f".old-{BEST}"):
        if copy.is_dir() and checkpoint.verify(copy) is None:
            copy.rename(best)
            return (f"checkpoints/{BEST}/ restored from {copy.name} (step "
                    f"{checkpoint.read_meta(best)['step']}): a process died while replacing it")
    return None


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)
