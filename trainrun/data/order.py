"""The order in which training sequences are seen (docs/design.md, Data).

Epoch e visits the sequences in one permutation that depends on (seed, e) alone. The run
reads that stream front to back, `window` sequences per update, so the order never depends
on batch size, accumulation or the number of processes; an epoch's last window may be
shorter, and the next update starts the next epoch.
"""

from __future__ import annotations

import numpy as np

from trainrun.errors import ConfigError


def sequences_per_update(batch_size: int, grad_accum_steps: int, processes: int) -> int:
    """The sequences one update trains on, the window it reads of the order: each of the
    processes runs grad_accum_steps micro-batches of batch_size sequences."""
    return batch_size * grad_accum_steps * processes


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` (0-based) over n sequences: 4 bytes per sequence while
    n < 2**32 (the same shuffle as NumPy's `permutation(n)`, which would hold 8), so that a corpus of
    billions of tokens keeps its order in a modest array."""
    order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(order)  # in place: no second copy
    return order


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
        if state["seed"] != self.seed:
            raise ConfigError(
                "trainer.seed", f"{self.seed} differs from the checkpoint's {state['seed']}, "
                f"which fixed the data order; allowed: {state['seed']}"
            )
        if state["n"] != self.n:
            raise ConfigError(
                "data", f"{self.n} training sequences, the checkpoint's data had {state['n']}; "
                f"allowed: the data and data.seq_len of the checkpoint"
            )
        epoch, offset = state["epoch"], state["offset"]
        if min(epoch, offset) < 0:
            raise ValueError(f"order: epoch {epoch}, offset {offset}; a data position is two "
                             f"whole numbers >= 0")
        self.epoch, self.offset = epoch, offset
        self._perm = permutation(self.n, self.seed, self.epoch)


def micro_batches(window: np.ndarray, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> list[np.ndarray]:
    """This rank's share of an update's window, cut into micro-batches of batch_size.

    The window is cut into world_size contiguous shares, rank 0 first (the first shares one
    sequence longer when world_size does not divide it); concatenated in rank order they
    are the window. Every rank gets the same number of micro-batches, enough for the
    largest share, so that the ranks' forward/backward passes and gradient all-reduces
    pair up under DDP: at the short end of an epoch a rank's last micro-batches may hold
    fewer than batch_size sequences, or none. With one process there is never an empty one.
    """
    shares = np.array_split(np.asarray(window), world_size)
    count = -(-len(shares[0]) // batch_size)
    share = shares[rank]
    return [share[i * batch_size : (i + 1) * batch_size] for i in range(count)]
