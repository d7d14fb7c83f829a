"""data.streaming=true: a `datasets` source read as a stream, for corpora larger than the disk
can hold as token files (docs/data.md, Streaming).

The source's shards (its files, or a hub data set's) are read in an order that depends on
(trainer.seed, epoch), each shard's documents in their own order; a background thread
tokenizes them ahead of the loop and packs them, each followed by the end-of-document id,
into rows of seq_len + 1 tokens, each row starting on the last token of the one before (as
packed Sequences do). Rows are shuffled in chunks of data.shuffle_buffer rows, chunk c of
epoch e by a permutation seeded with (seed, e, c). The stream is its own data order
(`make_order`): `next_window(size)` hands out the next `size` rows, every rank reading the
whole stream and training on its share of each window.

A position is (epoch, chunk, where the chunk's first row starts: shard, document, token
offset in that document, and the rows of the chunk already taken): a handful of integers,
saved in every checkpoint. A resume reads the chunk's shard again from that document on
(the documents before it are read and dropped, not tokenized), rebuilds the chunk and skips
the rows taken: exactly the rows an uninterrupted run would have seen.

Validation is a fixed first slice: the first data.val_documents documents of the source's
validation split (data=hf), else of the source itself in its own order, which training then
never reads.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trainrun import faults
from trainrun.data.sequences import Sequences
from trainrun.data.storage import dtype_for
from trainrun.data.stream_reader import Chunk, Closed, Reader
from trainrun.errors import ConfigError, require_positive

POLL_SECONDS = 0.1  # how often a waiting reader or loop looks whether it should stop
JOIN_SECONDS = 10.0  # how long close() waits for the reader to end (it checks per document)


class StreamFailed(ConfigError):
    """The stream's data cannot be read on (a file not text in data.encoding, met mid-run):
    one line. Before training it is a refused start; during training it fails the run, which
    saves nothing new (`previous`: the newest checkpoint, set by the loop)."""

    advice = "fix or replace the file"
    previous = None


class StreamStopped(Exception):
    """A stop signal came while the loop waited for the stream's rows: the stream is back at
    the position it had before the window was asked for, which a checkpoint can save."""


@dataclass
class StreamingKeys:
    """The keys of the data options that can stream (data=text, data=hf)."""

    streaming: bool = False  # read the source as a stream, tokenized on the fly
    shuffle_buffer: int = 1024  # rows shuffled together (1: the stream's own order)
    val_documents: int = 1000  # the validation slice: the first N documents

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_positive(f"{prefix}.shuffle_buffer", self.shuffle_buffer)
        require_positive(f"{prefix}.val_documents", self.val_documents)
        if not self.streaming:
            return
        if not self.packing:
            raise ConfigError(f"{prefix}.packing", f"false with {prefix}.streaming=true; "
                              f"allowed: true (a stream packs documents as it reads them)")
        if self.max_documents is not None:
            raise ConfigError(f"{prefix}.max_documents", f"{self.max_documents} with "
                              f"{prefix}.streaming=true; allowed: null (a stream reads every "
                              f"document; trainer.max_steps bounds the run)")

    def stream_sources(self) -> tuple[Source, Source | None]:
        """The training source, and the validation split's (None: none of its own)."""
        raise NotImplementedError


@dataclass
class Source:
    """A `datasets` source as shards of texts: open(k) iterates shard k's documents' texts."""

    shards: int
    open: Callable[[int], Iterator[str]]
    identity: dict  # what names it in checkpoints (no content hash: it may not fit the disk)
    name: str  # for the run's log


def of_iterable(ds, column: str, key: str, identity: dict, name: str,
                undecodable: Callable[[int, UnicodeDecodeError], StreamFailed] | None = None
                ) -> Source:
    """A Source over a `datasets.IterableDataset`, its texts in `column`; `undecodable`(shard,
    error) is the one-line error for a shard that is not text in its encoding."""
    def open_shard(k: int) -> Iterator[str]:
        try:
            for example in ds.shard(num_shards=ds.n_shards, index=k):
                if column not in example:
                    raise ConfigError(key, f"no column {column!r}; the data has "
                                           f"{', '.join(example)}")
                yield example[column]
        except Exception as exc:  # datasets may wrap the UnicodeDecodeError of a builder
            cause = decode_error(exc)
            if cause is None:
                raise
            raise (undecodable(k, cause) if undecodable is not None else StreamFailed(
                "data", f"shard {k} of {name} is not text in its encoding ({cause})")) from None

    return Source(ds.n_shards, open_shard, identity, name)


def decode_error(exc: BaseException | None) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError `exc` is or was raised from, if any."""
    while exc is not None and not isinstance(exc, UnicodeDecodeError):
        exc = exc.__cause__ or exc.__context__
    return exc


def first_documents(source: Source, n: int) -> tuple[list[str], tuple[int, int]]:
    """The first n documents of the source in its own order (blank ones too, as read), and
    where they end: (shard, document index in it) of the first one not taken."""
    texts: list[str] = []
    for k in range(source.shards):
        for i, text in enumerate(source.open(k)):
            if len(texts) == n:
                return texts, (k, i)
            texts.append(text)
    return texts, (source.shards, 0)


def validation_slice(texts: list[str], tokenizer, seq_len: int) -> Sequences:
    """The slice's non-blank documents, tokenized in memory (they are few), as packed
    Sequences that validation.py reads like any split."""
    texts = [t for t in texts if t and t.strip()]
    ids = tokenizer.encode_batch(texts) if texts else []
    tokens = np.concatenate([p for a in ids for p in (a, [tokenizer.eot])] or [[]]).astype(
        dtype_for(tokenizer.vocab_size))
    offsets = np.concatenate([[0], np.cumsum([len(a) + 1 for a in ids])]).astype(np.int64)
    record = {"documents": _digest(texts), "tokens": hashlib.sha256(tokens).hexdigest(),
              "count": len(tokens)}
    return Sequences(tokens, offsets, seq_len, True, tokenizer.eot, record)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class Prefetch:
    """Runs a Reader's chunks in a daemon thread, at least `ahead` rows ahead of get() (the
    thread waits once that many are queued); its error, once the chunks before it are taken,
    is raised by every get() from then on. close() stops the thread (the reader looks at the
    stop event per document) and waits for it to end."""

    def __init__(self, start: Callable[[threading.Event], Iterator[Chunk]], ahead: int):
        self._stop = threading.Event()
        self._ready = threading.Condition()
        self._queue: deque[Chunk] = deque()
        self._rows, self._ahead = 0, max(1, ahead)
        self._error: BaseException | None = None
        self._ended = False
        self._stalled = False  # tests: faults.stream_stall_at()
        self._thread = threading.Thread(target=self._run, args=(start(self._stop),),
                                        daemon=True, name="trainrun-stream")
        self._thread.start()

    def _run(self, chunks: Iterator[Chunk]) -> None:
        stall = faults.stream_stall_at()
        try:
            for n, chunk in enumerate(chunks):
                if n == stall:
                    with self._ready:
                        self._stalled = True
                    self._stop.wait()
                    return
                with self._ready:
                    while self._rows >= self._ahead and not self._stop.is_set():
                        self._ready.wait(POLL_SECONDS)
                    if self._stop.is_set():
                        return
                    self._queue.append(chunk)
                    self._rows += len(chunk.rows)
                    self._ready.notify_all()
        except Closed:
            pass
        except BaseException as error:  # noqa: BLE001 (handed to the loop's thread)
            with self._ready:
                self._error = error
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify_all()

    def get(self, stopping: Callable[[], bool] | None = None) -> Chunk:
        """The next chunk; the reader's error if it failed (every time); StreamStopped when
        `stopping`() turns true while the queue is empty. Never waits on a reader that has
        ended."""
        with self._ready:
            while True:
                if self._queue:
                    chunk = self._queue.popleft()
                    self._rows -= len(chunk.rows)
                    self._ready.notify_all()
                    return chunk
                if self._error is not None:
                    raise self._error
                if self._ended or not self._thread.is_alive():
                    raise RuntimeError("the stream's reader ended without its rows")
                if stopping is not None and stopping():
                    raise StreamStopped
                if self._stalled:  # tests: a stop signal that comes while the loop waits
                    self._stalled = False
                    faults.stop_while_stalled()
                self._ready.wait(POLL_SECONDS)

    def close(self, wait: float = JOIN_SECONDS) -> None:
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        if wait > 0 and self._thread is not threading.current_thread():
            self._thread.join(wait)


class Stream:
    """The training data of a streaming run and its own order: next_window, batch,
    num_targets, state_dict and load_state_dict (docs/data.md, Streaming)."""

    def __init__(self, source: Source, tokenizer, seq_len: int, buffer: int,
                 held: tuple[int, int], record: dict):
        self.source, self.tokenizer, self.seq_len, self.buffer = source, tokenizer, seq_len, buffer
        self.held, self.record, self.seed = held, record, 0
        self.epoch, self.number, self.start, self.taken, self.served = 0, 0, (0, 0, 0), 0, 0
        self._chunk: Chunk | None = None
        self._prefetch: Prefetch | None = None
        self._window, self._first = np.zeros((0, seq_len + 1), np.int64), 0
        # set by the loop (one process): whether a stop was asked for, so that a wait for
        # rows ends in StreamStopped instead of lasting as long as the reader stalls
        self.stopping: Callable[[], bool] | None = None

    def make_order(self, seed: int) -> Stream:
        self.seed = seed
        return self

    def reader(self, stop: threading.Event | None = None) -> Reader:
        return Reader(self.source, self.tokenizer, self.seq_len, self.buffer, self.seed,
                      self.held, stop)

    def describe(self) -> str:
        return (f"a stream of {self.source.name} ({self.source.shards} shard(s)), rows of "
                f"{self.seq_len} tokens shuffled in chunks of {self.buffer}")

    def next_window(self, size: int) -> np.ndarray:
        """The next `size` rows, as sequence numbers counted from the run's start: batch()
        reads them (those of this window only). StreamStopped (with `stopping` set) leaves
        the position as it was before the call."""
        before = self.state_dict() if self.stopping is not None else None
        try:
            return self._next_window(size)
        except StreamStopped:
            self.close(wait=0)  # a stalled reader (a daemon) ends when it can: not waited for
            self.load_state_dict(before)
            raise

    def _next_window(self, size: int) -> np.ndarray:
        parts = []
        while size > sum(len(p) for p in parts):
            if self._chunk is None:
                self._start_reading(size)
            rows = self._chunk.rows
            if self.taken == len(rows):
                self._chunk = self._next_chunk()
                self.epoch, self.number, self.start = (self._chunk.epoch, self._chunk.number,
                                                       self._chunk.start)
                self.taken, rows = 0, self._chunk.rows
            take = min(size - sum(len(p) for p in parts), len(rows) - self.taken)
            parts.append(rows[self.taken : self.taken + take])
            self.taken += take
        self._window, self._first = np.concatenate(parts).astype(np.int64), self.served
        self.served += size
        return np.arange(self._first, self.served, dtype=np.int64)

    def _start_reading(self, size: int) -> None:
        """The background thread, from the chunk of the current position (its rows taken
        already are skipped), two windows of `size` rows and a chunk ahead of the loop."""
        self.close()
        epoch, number, start = self.epoch, self.number, self.start
        self._prefetch = Prefetch(lambda stop: self.reader(stop).chunks(epoch, number, start),
                                  2 * size + self.buffer)
        weakref.finalize(self, self._prefetch.close)
        self._chunk = self._next_chunk()

    def _next_chunk(self) -> Chunk:
        return self._prefetch.get(self.stopping)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._window[np.asarray(indices, dtype=np.int64) - self._first]
        return (torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
                torch.from_numpy(np.ascontiguousarray(rows[:, 1:])))

    def num_targets(self, indices: np.ndarray) -> int:
        return len(indices) * self.seq_len

    def state_dict(self) -> dict:
        return {"stream": True, "seed": self.seed, "seq_len": self.seq_len,
                "shards": self.source.shards, "buffer": self.buffer, "epoch": self.epoch,
                "chunk": self.number, "start": list(self.start), "taken": self.taken,
                "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("stream"):
            raise ConfigError("data.streaming", "true, the checkpoint's data were not a "
                                                "stream; allowed: false")
        mine = self.state_dict()
        for key, name in (("seed", "trainer.seed"), ("seq_len", "data.seq_len"),
                          ("buffer", "data.shuffle_buffer"), ("shards", "data")):
            if state[key] != mine[key]:
                what = "shards" if key == "shards" else ""
                raise ConfigError(name, f"{mine[key]}{' ' + what if what else ''} differs from "
                                        f"the checkpoint's {state[key]}, which the stream's "
                                        f"position depends on; allowed: {state[key]}")
        numbers = [state[k] for k in ("epoch", "chunk", "taken", "served")] + list(state["start"])
        if len(state["start"]) != 3 or min(numbers) < 0:
            raise ValueError(f"stream position {state!r}: whole numbers >= 0 expected")
        self.close()
        self._chunk = None
        self.epoch, self.number, self.taken, self.served = (state["epoch"], state["chunk"],
                                                            state["taken"], state["served"])
        self.start = tuple(state["start"])

    def close(self, wait: float = JOIN_SECONDS) -> None:
        """Stop the background thread, if it runs, and wait up to `wait` seconds for it to
        end."""
        if self._prefetch is not None:
            self._prefetch.close(wait)
            self._prefetch = None


def load(cfg: StreamingKeys, tokenizer_cfg, log: Callable[[str], None], tokenizer=None,
         check_train: bool = True) -> tuple[Stream, Sequences, object]:
    """The training stream, the validation slice (tokenized now) and the tokenizer (given,
    or built by tokenizer_cfg: byte or hf, which need no pass over the documents);
    check_train=False: the stream's first training row is not read (only validation is
    wanted: trainrun-eval)."""
    train, validation = cfg.stream_sources()
    tokenizer = tokenizer or tokenizer_cfg.build(None, log)
    texts, end = first_documents(validation or train, cfg.val_documents)
    held = (0, 0) if validation is not None else end
    val = validation_slice(texts, tokenizer, cfg.seq_len)
    if len(val) == 0:
        raise ConfigError("data.val_documents", f"the first {len(texts):,} document(s) of "
                          f"{(validation or train).name} hold no sequence of data.seq_len="
                          f"{cfg.seq_len} tokens; allowed: more documents (a larger "
                          f"data.val_documents)")
    record = {"stream": train.name, "documents": _digest(train.identity),
              "tokens": _digest([train.identity, tokenizer.fingerprint(), list(held)]),
              "count": None}
    stream = Stream(train, tokenizer, cfg.seq_len, cfg.shuffle_buffer, held, record)
    if check_train and next(stream.reader().rows(0, (0, 0, 0)), None) is None:
        raise ConfigError("data.val_documents" if validation is None else "data", f"no "
                          f"training sequence of data.seq_len={cfg.seq_len} tokens in "
                          f"{train.name}" + ("" if validation is not None else
                          f" after the first {cfg.val_documents:,} document(s), held out for "
                          f"validation; allowed: fewer (or data.sample_by=line|paragraph: "
                          f"more documents per file)"))
    where = ("its own validation split" if validation is not None else
             "held out from the stream's start, never trained on")
    log(f"data: {stream.describe()}; validation: the first {len(texts):,} "
        f"documents, {where}: {len(val.tokens):,} tokens")
    return stream, val, tokenizer
