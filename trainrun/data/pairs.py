"""Sentence pairs as tensors (docs/translation.md): the tokens of each side in its own token
file (storage.py), a pair i being document i of both.

A pair reads as the source's tokens and its end-of-sentence id, and the target between two
of them: the decoder is fed `eot t1 .. tn` and predicts `t1 .. tn eot`. A batch is padded to
its longest source and target; the source's padding is masked by its length, the target's
left out of the loss (IGNORE).

`Pairs` are one pair per index (validation, decoding); `Buckets` one micro-batch per index:
pairs of similar length, up to data.max_tokens tokens with the padding (or data.batch_size
pairs), made once per run from the lengths and a seed. The data order (order.py) then
shuffles the buckets per epoch as it shuffles sequences, so an update's pairs never depend
on accumulation or the number of processes, and its loss is normalized by the target
tokens of all its buckets (update.py).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from trainrun.data.sequences import IGNORE


class Side:
    """One side's documents in a token file: document j is tokens[starts[j] : ends[j]],
    its end-of-document id last."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens = tokens
        self.starts = np.asarray(offsets[:-1], dtype=np.int64)
        self.lengths = np.diff(np.asarray(offsets, dtype=np.int64))

    def rows(self, docs: np.ndarray, width: int, fill: int, shift: int = 0) -> np.ndarray:
        """(len(docs), width) int64: each document's tokens (shift=1: after one `fill`,
        its last id left out), the rest `fill`."""
        out = np.full((len(docs), width), fill, dtype=np.int64)
        for row, doc in enumerate(docs):
            start, length = self.starts[doc], self.lengths[doc]
            out[row, shift:shift + length - shift] = self.tokens[start:start + length - shift]
        return out


class Pairs:
    """Sentence pairs, one per index: `batch(indices)` -> (src, src_lengths, tgt_in, tgt_out)
    int64 tensors, the model's inputs and the targets. `kept` are the documents of the
    token files that are within the length limits, in order; `texts` the split's pairs as
    text (a `datasets.Dataset` with source and target), for BLEU's references."""

    def __init__(self, source: Side, target: Side, limits: tuple[int, int], eot: int,
                 texts=None, record: dict | None = None):
        self.source, self.target, self.eot, self.texts = source, target, eot, texts
        self.limits = limits
        fits = (source.lengths <= limits[0]) & (target.lengths <= limits[1])
        self.kept = np.flatnonzero(fits)
        self.dropped = len(fits) - len(self.kept)
        self.record = record or {}
        self.src_lengths = source.lengths[self.kept]
        self.tgt_lengths = target.lengths[self.kept]  # decoder positions: sentence + eot

    def __len__(self) -> int:
        return len(self.kept)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        indices = np.asarray(indices, dtype=np.int64)
        docs = self.kept[indices]
        src_len, tgt_len = self.src_lengths[indices], self.tgt_lengths[indices]
        S, T = int(src_len.max(initial=1)), int(tgt_len.max(initial=1))
        src = self.source.rows(docs, S, self.eot)
        tgt_in = self.target.rows(docs, T, self.eot, shift=1)
        tgt_out = self.target.rows(docs, T, IGNORE)
        return (torch.from_numpy(src), torch.from_numpy(src_len.copy()),
                torch.from_numpy(tgt_in), torch.from_numpy(tgt_out))

    def num_targets(self, indices: np.ndarray) -> int:
        return int(self.tgt_lengths[np.asarray(indices, dtype=np.int64)].sum())

    def sources(self, indices: np.ndarray) -> list[list[int]]:
        """The source sentences' ids, end of sentence left out (what a user's line gives)."""
        docs = self.kept[np.asarray(indices, dtype=np.int64)]
        s = self.source
        return [s.tokens[s.starts[d]:s.starts[d] + s.lengths[d] - 1].tolist() for d in docs]

    def references(self, indices: np.ndarray) -> list[str]:
        """The target sentences as text, as the files have them (BLEU's references)."""
        docs = self.kept[np.asarray(indices, dtype=np.int64)]
        return [self.texts[int(d)]["target"] for d in docs]

    def identity(self) -> list:
        """What names the pairs of a validation set (validation.fingerprint)."""
        return [self.record.get("tokens"), list(self.limits), "pairs"]


def buckets(pairs: Pairs, max_tokens: int | None, batch_size: int, seed: int) -> list[np.ndarray]:
    """The pairs cut into micro-batches of similar length: sorted by (target, source) length,
    ties in a seeded order, then cut where the next pair would take the batch past
    max_tokens, counted as pairs x (longest source or target) with the padding; without
    max_tokens, every batch_size pairs. Every pair is in exactly one bucket."""
    n = len(pairs)
    shuffled = np.random.default_rng([seed, 0x5EED]).permutation(n)
    order = shuffled[np.lexsort((pairs.src_lengths[shuffled], pairs.tgt_lengths[shuffled]))]
    if max_tokens is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    longest = np.maximum(pairs.src_lengths, pairs.tgt_lengths)[order]
    out, start, widest = [], 0, 0
    for i, length in enumerate(longest):
        widest_with = max(widest, int(length))
        if i > start and (i - start + 1) * widest_with > max_tokens:
            out.append(order[start:i])
            start, widest_with = i, int(length)
        widest = widest_with
    if start < n:
        out.append(order[start:])
    return out


class Buckets:
    """The training pairs as micro-batches: index b is bucket b, so that the data order
    (order.py) and accumulation see one unit per micro-batch (batch size 1)."""

    def __init__(self, pairs: Pairs, max_tokens: int | None, batch_size: int, seed: int):
        self.pairs, self.max_tokens = pairs, max_tokens
        self.buckets = buckets(pairs, max_tokens, batch_size, seed)
        self.targets = np.array([pairs.num_targets(b) for b in self.buckets], dtype=np.int64)
        size = batch_size if max_tokens is None else None  # what cuts the buckets
        digest = hashlib.sha256(json.dumps([pairs.identity(), max_tokens, size, seed])
                                .encode()).hexdigest()[:16]
        self.record = {**pairs.record, "buckets": len(self.buckets), "batching": digest}

    def __len__(self) -> int:
        return len(self.buckets)

    def pairs_of(self, indices: np.ndarray) -> np.ndarray:
        chosen = [self.buckets[int(b)] for b in np.asarray(indices, dtype=np.int64)]
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        return self.pairs.batch(self.pairs_of(indices))

    def num_targets(self, indices: np.ndarray) -> int:
        return int(self.targets[np.asarray(indices, dtype=np.int64)].sum())

    def padded_tokens(self, b: int) -> int:
        """What bucket b costs: its pairs x its longest source or target."""
        ix = self.buckets[b]
        return len(ix) * int(max(self.pairs.src_lengths[ix].max(), self.pairs.tgt_lengths[ix].max()))
