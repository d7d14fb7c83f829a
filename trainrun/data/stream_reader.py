"""The rows of a stream (data.streaming=true; docs/data.md, Streaming) from any position:
documents in the epoch's shard order, tokenized, packed into rows of seq_len + 1 tokens, and
shuffled in chunks. stream.py runs it in a background thread and keeps the position."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from trainrun.data.order import permutation
from trainrun.data.storage import BATCH, dtype_for
from trainrun.errors import ConfigError

CHARACTERS = 8 << 20  # a tokenize batch ends at BATCH documents or this many characters


class Closed(Exception):
    """The reader was asked to stop (Reader.stop): raised between documents."""


@dataclass(frozen=True)
class Chunk:
    epoch: int
    number: int  # of the chunk in its epoch, 0-based
    start: tuple[int, int, int]  # its first row: shard (in the epoch's order), document, token
    rows: np.ndarray  # (n, seq_len + 1), shuffled


class Reader:
    """The stream's rows, from any position: what the background thread runs."""

    def __init__(self, source, tokenizer, seq_len: int, buffer: int, seed: int,
                 held: tuple[int, int], stop=None):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.buffer, self.seed, self.held = buffer, seed, held
        self.stop = stop  # a threading.Event: once set, the next document raises Closed
        self.dtype = dtype_for(tokenizer.vocab_size)

    def shard_order(self, epoch: int) -> np.ndarray:
        return permutation(self.source.shards, self.seed, epoch)

    def documents(self, epoch: int, shard: int, doc: int) -> Iterator[tuple[int, int, str]]:
        """(shard position, document index, text) of the epoch's non-blank training
        documents from (shard, doc) on; those held out for validation are left out."""
        order = self.shard_order(epoch)
        for s in range(shard, self.source.shards):
            k, held_shard, held_doc = int(order[s]), *self.held
            if k < held_shard:
                continue  # wholly held out
            first = max(doc if s == shard else 0, held_doc if k == held_shard else 0)
            for i, text in enumerate(self.source.open(k)):
                if self.stop is not None and self.stop.is_set():
                    raise Closed
                if i >= first and text and text.strip():
                    yield s, i, text

    def tokenized(self, epoch: int, shard: int, doc: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """documents(), as their ids (in the token dtype) followed by the end-of-document id,
        tokenized BATCH documents or CHARACTERS characters at a time, whichever comes first,
        so that what is held does not grow with the documents' size."""
        for batch in self.batches(self.documents(epoch, shard, doc)):
            ids = self.tokenizer.encode_batch([text for _, _, text in batch])
            for j, (s, i, _) in enumerate(batch):
                a, ids[j] = ids[j], None  # each document's ids are let go once converted
                out = np.empty(len(a) + 1, self.dtype)
                out[:-1], out[-1] = a, self.tokenizer.eot
                yield s, i, out

    @staticmethod
    def batches(docs: Iterator[tuple[int, int, str]]) -> Iterator[list]:
        batch, characters = [], 0
        for d in docs:
            batch.append(d)
            characters += len(d[2])
            if len(batch) == BATCH or characters >= CHARACTERS:
                yield batch
                batch, characters = [], 0
        if batch:
            yield batch

    def rows(self, epoch: int, start: tuple[int, int, int]
             ) -> Iterator[tuple[tuple[int, int, int], np.ndarray]]:
        """(where it starts, row) of each row of seq_len + 1 tokens of the epoch from `start`
        on; the tokens left at the epoch's end, too few for a row, are dropped."""
        T = self.seq_len
        pending: deque = deque()  # [shard, doc, offset, ids]: tokens not yet past
        have = 0
        for s, i, ids in self.tokenized(epoch, start[0], start[1]):
            offset = start[2] if (s, i) == start[:2] else 0
            pending.append([s, i, offset, ids])
            have += len(ids) - offset
            while have >= T + 1:
                row, filled = np.empty(T + 1, self.dtype), 0
                for _, _, off, part in pending:
                    take = min(T + 1 - filled, len(part) - off)
                    row[filled : filled + take] = part[off : off + take]
                    filled += take
                    if filled == T + 1:
                        break
                yield tuple(pending[0][:3]), row
                dropped = T  # the row's last token starts the next row
                while dropped:
                    head = pending[0]
                    step = min(dropped, len(head[3]) - head[2])
                    head[2] += step
                    dropped -= step
                    if head[2] == len(head[3]):
                        pending.popleft()
                have -= T

    def chunks(self, epoch: int, number: int, start: tuple[int, int, int]) -> Iterator[Chunk]:
        """The shuffled chunks from chunk `number` of `epoch`, which starts at `start`, on,
        epoch after epoch."""
        while True:
            rows: list = []
            first = start
            produced = number > 0
            for where, row in self.rows(epoch, start):
                if not rows:
                    first = where
                rows.append(row)
                if len(rows) == self.buffer:
                    yield self.chunk(epoch, number, first, rows)
                    number, rows, produced = number + 1, [], True
            if rows:
                yield self.chunk(epoch, number, first, rows)
            elif not produced:
                raise ConfigError("data", f"epoch {epoch} of the stream has no sequence of "
                                          f"data.seq_len={self.seq_len} tokens")
            epoch, number, start = epoch + 1, 0, (0, 0, 0)

    def chunk(self, epoch: int, number: int, start, rows: list) -> Chunk:
        shuffle = np.random.default_rng([self.seed, epoch, 1, number]).permutation(len(rows))
        return Chunk(epoch, number, tuple(start), np.stack(rows)[shuffle])
