"""Fixed-length training sequences over a split's flat token array (docs/data.md).

With packing the documents are concatenated (each ends with the end-of-document id) and cut
into windows of seq_len + 1 tokens; without it each document is one sequence, truncated and
padded, its padding excluded from the loss. The token array may be a read-only memory map:
a batch reads only the pages of its own sequences.
"""

from __future__ import annotations

import os

import numpy as np
import torch

IGNORE = -100  # target id excluded from the loss (padding)


class Sequences:
    """Fixed-length training sequences; `batch(indices)` -> inputs, targets (B, T) int64.

    `pad_id` is the input id at padded positions (the end-of-document id): any real id
    does, as no target follows it. `record` says where the tokens come from (the documents'
    fingerprint, the token file's sha256 and its number of tokens), for checkpoints."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, packing: bool,
                 pad_id: int, record: dict | None = None):
        self.tokens, self.offsets, self.seq_len, self.packing = tokens, offsets, seq_len, packing
        self.pad_id, self.record = pad_id, record
        self._fd: int | None = None
        self._fd_pid = 0
        if packing:
            self.n = max(0, len(tokens) - 1) // seq_len
        else:
            lengths = np.diff(offsets)
            self.starts = offsets[:-1][lengths >= 2]  # a document needs one target at least
            self.lengths = np.minimum(lengths[lengths >= 2], seq_len + 1)
            self.n = len(self.starts)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        cols = np.arange(T + 1)
        indices = np.asarray(indices, dtype=np.int64)  # the order's uint32 ids times T overflow
        if self.packing:
            rows = self.rows(indices * T, np.full(len(indices), T + 1))
            x, y = rows[:, :-1], rows[:, 1:]
        else:
            starts, lengths = self.starts[indices], self.lengths[indices]
            real = cols < lengths[:, None]
            rows = np.where(real, self.rows(starts, lengths), self.pad_id)
            x = rows[:, :-1]
            y = np.where(real[:, 1:], rows[:, 1:], IGNORE)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def rows(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(len(starts), seq_len + 1) int64: tokens[start : start + length] in each row, the
        rest 0. From a token file, each row is read with pread rather than through the map:
        a page touched through a map stays in the process's resident memory (with the page
        cache's large folios, up to megabytes per random read), while read pages stay in
        the page cache only, shared by every process."""
        out = np.zeros((len(starts), self.seq_len + 1), dtype=np.int64)
        if not isinstance(self.tokens, np.memmap):
            for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
                out[row, :length] = self.tokens[start : start + length]
            return out
        if self._fd is None or self._fd_pid != os.getpid():  # a forked process opens its own
            self._fd, self._fd_pid = os.open(self.tokens.filename, os.O_RDONLY), os.getpid()
        size = self.tokens.dtype.itemsize
        for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            raw = os.pread(self._fd, int(length) * size, int(start) * size + self.tokens.offset)
            out[row, :length] = np.frombuffer(raw, dtype=self.tokens.dtype)
        return out

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def identity(self) -> list:
        """What names the sequences of a validation set (validation.fingerprint)."""
        return [(self.record or {}).get("tokens"), self.seq_len, self.packing]

    def num_targets(self, indices: np.ndarray) -> int:
        """Target tokens (those the loss counts) in the sequences `indices`."""
        if self.packing:
            return len(indices) * self.seq_len
        return int((self.lengths[indices] - 1).sum())


class Windows:
    """Every target of a split, for data scored whole (trainrun-eval): its tokens in windows
    of at most seq_len + 1, each starting on the last token of the one before, so that every
    token is a target exactly once. `batch(indices)` -> inputs, targets (B, T) int64, as
    Sequences gives them (IGNORE past a short window's end).

    Packed, the documents are one stream, read after one end-of-document id (as training
    reads a document after the previous one's): every token is a target. Unpacked, each
    document is read alone from its first token, as training reads it: every token but a
    document's first is a target."""

    def __init__(self, seqs: Sequences):
        T, self.seqs, self.seq_len = seqs.seq_len, seqs, seqs.seq_len
        if seqs.packing:
            n = len(seqs.tokens)
            starts = np.arange(0, n, T, dtype=np.int64) - 1  # -1: the id before the stream
            ends = np.minimum(starts + T + 1, n)
        else:
            first, last = np.asarray(seqs.offsets[:-1]), np.asarray(seqs.offsets[1:])
            keep = last - first >= 2  # a document needs one target at least
            first, last = first[keep], last[keep]
            count = -(-(last - first - 1) // T)  # windows per document
            doc = np.repeat(np.arange(len(first)), count)
            nth = np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)
            starts = first[doc] + nth * T
            ends = np.minimum(starts + T + 1, last[doc])
        self.starts, self.lengths = starts.astype(np.int64), (ends - starts).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.starts[indices], self.lengths[indices]
        before = starts < 0  # the stream's first window: the end-of-document id, then tokens
        rows = self.seqs.rows(np.maximum(starts, 0), lengths - before)
        rows[before, 1:] = rows[before, :-1]
        rows[before, 0] = self.seqs.pad_id
        real = np.arange(self.seq_len + 1) < lengths[:, None]
        rows = np.where(real, rows, self.seqs.pad_id)
        y = np.where(real[:, 1:], rows[:, 1:], IGNORE)
        return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(y)

    def num_targets(self, indices: np.ndarray) -> int:
        return int((self.lengths[np.asarray(indices, dtype=np.int64)] - 1).sum())
