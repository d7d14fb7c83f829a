"""The order in which training sequences are seen (SPEC §3).

Epoch e visits the sequences in one permutation that depends on (seed, e) alone. The run
reads that stream front to back, `window` sequences per update, so the order never depends
on batch size, accumulation or the number of processes; an epoch's last window may be
shorter, and the next update starts the next epoch.
"""

from __future__ import annotations

import numpy as np


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` (0-based) over n sequences."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class DataOrder:
    """Position in the seeded stream of sequence indices; checkpointed with state_dict()."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.offset = 0, 0
        self._perm = permutation(n, seed, 0)

    def next_window(self, size: int) -> np.ndarray:
        """The next `size` sequence indices, fewer at the end of an epoch."""
        if self.offset >= self.n:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = permutation(self.n, self.seed, self.epoch)
        window = self._perm[self.offset : self.offset + size]
        self.offset += len(window)
        return window

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["seed"]) != (self.n, self.seed):
            raise ValueError(
                f"data order of {state['n']} sequences with seed {state['seed']} does not match "
                f"this run's {self.n} sequences with seed {self.seed}"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = permutation(self.n, self.seed, self.epoch)


def micro_batches(window: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's share of an update's window, cut into micro-batches of batch_size.

    Under DDP each rank takes a contiguous slice of the global window.
    """
    share = np.array_split(window, world_size)[rank]
    return [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
