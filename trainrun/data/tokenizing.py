"""A split's documents tokenized in parallel (docs/data.md, Token storage): cut into chunks of
CHUNK consecutive documents, each chunk encoded by one of `data.tokenize_workers` threads and
written by one at its place in the token file (where the chunks before it end); the writer
(storage.write_split) takes the chunks in their order for the checksum and the offsets. The
token files are the same bytes whatever the number of workers: a document's ids do not
depend on which chunk or thread encoded it, nor a chunk's place on which thread wrote it.

Threads where the work mostly runs outside Python's lock: the documents are `datasets'`
memory-mapped Arrow table, which every thread reads without a copy; `tokenizers` lets go of
the lock while it encodes, and the byte tokenizer is a few NumPy operations on the Arrow
buffers. While they run, `tokenizers`' own thread pool is turned off
(TOKENIZERS_PARALLELISM=false), so that N workers use N cores rather than N times every core.
A tokenizer whose encode_many holds the lock (`holds_gil`: the byte-level BPE's word cache,
trainrun.data.word_cache) encodes in N forked processes instead, which read the same mapped
table and send each chunk's Chunk back; the threads still write them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from trainrun.errors import ConfigError

CHUNK = 1000  # documents per chunk: a worker's unit of work (never derived from the workers)
AHEAD = 2  # chunks per worker encoded ahead of the writer: what bounds the memory in use
MAX_WORKERS = 1024


def check_workers(key: str, value: str) -> None:
    """data.tokenize_workers is `auto` or a whole number from 1 to MAX_WORKERS."""
    if str(value).strip() == "auto":
        return
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        raise ConfigError(key, f"got {value!r}; allowed: auto (the cores this process may run "
                               f"on), or a whole number of workers from 1 to {MAX_WORKERS}")


def workers(value: str) -> int:
    """The number of workers (threads, or processes: write_chunks) that
    data.tokenize_workers=value asks for."""
    if str(value).strip() != "auto":
        return int(str(value).strip())
    from trainrun.threads import cores

    return cores()


def _sure_bytes() -> np.ndarray:
    """(256,) bool: the UTF-8 bytes that only a character other than whitespace (as
    str.strip() sees it) can hold: ASCII other than whitespace, and the lead bytes of no
    whitespace character. A document with one of them is not blank."""
    space = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    leads = {ch.encode("utf-8")[0] for ch in space}
    sure = np.zeros(256, bool)
    sure[[b for b in range(0x80) if b not in leads]] = True
    sure[[b for b in range(0xC0, 0x100) if b not in leads]] = True
    return sure


SURE = _sure_bytes()


@dataclass
class Chunk:
    """One chunk's non-blank documents: their ids, each document's followed by the
    end-of-document id (in the token file's dtype), the number of ids of each (the
    end-of-document id included), and the UTF-8 bytes of their text."""

    tokens: np.ndarray
    lengths: np.ndarray
    text_bytes: int


def utf8(texts) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow string array's UTF-8 bytes and its (len + 1) offsets into them, as numpy
    views of its buffers (no copy)."""
    import pyarrow as pa

    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = texts.cast(pa.large_string())  # string views, all-null columns
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    _, offsets, data = texts.buffers()
    offsets = np.frombuffer(offsets, width, len(texts) + 1, texts.offset * np.dtype(width).itemsize)
    data = np.zeros(0, np.uint8) if data is None else np.frombuffer(data, np.uint8)
    return data, offsets.astype(np.int64)


def non_blank(texts) -> np.ndarray:
    """(len(texts),) bool: which texts are documents (`t and t.strip()`: not null, not empty,
    not whitespace alone), decided on the UTF-8 bytes; a text holding none of the SURE bytes
    (whitespace, and maybe characters such as U+2014 that share a lead byte with one) is
    decided by str.strip() itself."""
    data, offsets = utf8(texts)
    keep = np.zeros(len(texts), bool)
    starts, sizes = offsets[:-1], np.diff(offsets)
    filled = np.flatnonzero(sizes > 0)
    keep[filled] = SURE[data[starts[filled]]]  # most documents: their first byte decides
    rest = np.flatnonzero((sizes > 0) & ~keep)
    if len(rest):  # any SURE byte in them: or over [start, end) of each, end as a sentinel
        sure = np.append(SURE[data[offsets[0]:offsets[-1]]], False)
        bounds = np.stack([starts[rest], starts[rest] + sizes[rest]], axis=1) - offsets[0]
        keep[rest] = np.logical_or.reduceat(sure, bounds.ravel())[::2]
    if texts.null_count:
        keep &= texts.is_valid().to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~keep & (sizes > 0)):
        text = texts[int(i)].as_py()
        keep[i] = bool(text and text.strip())
    return keep


def encode_chunk(table, tokenizer, dtype: np.dtype) -> Chunk:
    """A chunk of documents (a pyarrow table with a `text` column) as a Chunk."""
    import pyarrow as pa

    texts = table.column("text").combine_chunks()
    keep = non_blank(texts)
    if not keep.all():
        texts = texts.filter(pa.array(keep))
    _, offsets = utf8(texts)
    ids, counts = tokenizer.encode_many(texts)
    lengths = counts.astype(np.int64) + 1
    tokens = np.empty(int(lengths.sum()), dtype)
    ends = np.cumsum(lengths) - 1  # where each document's end-of-document id goes
    between = np.ones(len(tokens), bool)
    between[ends] = False
    tokens[ends] = tokenizer.eot
    tokens[between] = ids
    return Chunk(tokens, lengths, int(offsets[-1] - offsets[0]))


@contextlib.contextmanager
def own_threads_only():
    """`tokenizers` encodes on the calling thread alone (its thread pool off), as long as the
    block runs; the variable is read at every call, and put back after."""
    name = "TOKENIZERS_PARALLELISM"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def write_chunks(docs, tokenizer, dtype: np.dtype, n_workers: int, fd: int) -> Iterator[Chunk]:
    """The split's documents as Chunks of CHUNK documents, encoded by n_workers threads and
    written into the file `fd` one after the other, each at its place, by the same threads
    (a fresh file's pages cost about as much CPU as encoding bytes: one writer would cap the
    byte tokenizer). Yielded in order once its write is queued, at most AHEAD per worker
    ahead; the generator ends once every chunk is written. Closing it early (a stop while
    tokenizing) cancels what has not begun and waits for what has."""
    table = docs.with_format("arrow")
    spans = deque((a, min(a + CHUNK, len(docs))) for a in range(0, len(docs), CHUNK))
    encoding: deque = deque()
    writing: deque = deque()
    at = 0  # bytes of the file before the next chunk
    with own_threads_only(), processes(table, tokenizer, dtype, min(n_workers, len(spans))) \
            as encoders, ThreadPoolExecutor(n_workers, "tokenize") as pool:

        def encode_ahead() -> None:
            while spans and len(encoding) < AHEAD * n_workers:
                a, b = spans.popleft()
                if encoders is not None:
                    encoding.append(encoders.submit(encode_span, a, b))
                else:
                    encoding.append(pool.submit(lambda a=a, b=b: encode_chunk(
                        table[a:b], tokenizer, dtype)))

        try:
            encode_ahead()
            while encoding:
                chunk = encoding.popleft().result()
                writing.append(pool.submit(write_at, fd, chunk.tokens, at))
                at += chunk.tokens.nbytes
                encode_ahead()
                while writing and (writing[0].done() or len(writing) > AHEAD * n_workers):
                    writing.popleft().result()  # a failed write's error (a full disk) here
                yield chunk
            while writing:
                writing.popleft().result()
        finally:
            for future in (*encoding, *writing):
                future.cancel()  # those under way finish before the pool's threads end


@contextlib.contextmanager
def processes(table, tokenizer, dtype: np.dtype, n: int) -> Iterator[Executor | None]:
    """n forked processes that encode spans of the table (encode_span), where the tokenizer
    holds Python's lock while it encodes and there are 2 workers or more; else None (the
    threads encode). They are forked before the threads start, and ignore the stop signals:
    the parent stops, cancels what has not begun, and they end with it; a parent killed
    outright, or ended at once by a second signal, takes them with it (PR_SET_PDEATHSIG)."""
    if not (getattr(tokenizer, "holds_gil", False) and n > 1 and sys.platform == "linux"):
        yield None
        return
    context = multiprocessing.get_context("fork")  # the mapped table, without a copy
    with ProcessPoolExecutor(n, context, initializer=_in_process,
                             initargs=(table, tokenizer, dtype, os.getpid())) as pool:
        yield pool


_process_state: tuple = ()


def _in_process(table, tokenizer, dtype: np.dtype, parent: int) -> None:
    global _process_state
    import ctypes

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed as its parent ends
    if os.getppid() != parent:  # it ended before that
        os._exit(1)
    _process_state = (table, tokenizer, dtype)


def encode_span(a: int, b: int) -> Chunk:
    """In a worker process: the Chunk of documents a..b-1 of its table."""
    table, tokenizer, dtype = _process_state
    return encode_chunk(table[a:b], tokenizer, dtype)


def write_at(fd: int, tokens: np.ndarray, at: int) -> None:
    """tokens' bytes into the file fd from byte `at` on."""
    view = memoryview(np.ascontiguousarray(tokens)).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
