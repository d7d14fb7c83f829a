"""Token storage: each split tokenized once into a flat token file (uint16 when the
vocabulary fits, else uint32) and its document offsets, in a cache folder keyed by the
fingerprints of the documents and the tokenizer; every process opens the files read-only
(sequences.py reads them).

A cache folder appears whole or not at all: it is written under another name while an
exclusive lock is held, its files synced to disk, then renamed into place. Two runs (or
ranks) starting together wait for each other instead of tokenizing twice, and a crash
leaves only a temporary folder that the next writer removes. Layout (docs/data.md, Token storage):

    <cache root>/tokens/<key>/{train,validation}.bin          tokens, end of document after each
    <cache root>/tokens/<key>/{train,validation}.offsets.npy  int64: where each document starts
    <cache root>/tokens/<key>/info.json                       sizes, fingerprints, checksums
    <cache root>/tokenizers/<key>/tokenizer.json              tokenizer=bpe, trained once
    <cache root>/documents/<content>/                         `datasets`' cache of local files

The token files are checked whenever they are opened (open_split), against the sha256 of
each written beside them in info.json: their sizes and the offsets always, the tokens whole
up to VERIFY_ALL bytes, beyond that SAMPLES blocks spread over the file (a truncation, an
appended or a re-tokenized file is always found; an edit between two sampled blocks is not).
An id beyond the vocabulary in what was read is an error too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainrun import rundir, signals
from trainrun.data import tokenizing
from trainrun.errors import ConfigError

FORMAT = 2  # of the files below; part of every key (2: checksums in info.json)
BATCH = 1000  # documents per batch read to train a BPE (tokenizer_options.py)
PROGRESS_SECONDS = 10.0
SPLITS = ("train", "validation")
VERIFY_ALL = 2 << 30  # token files up to this size are read whole at every open (~1 GB/s)
SAMPLES, SAMPLE_BYTES = 1024, 64 << 10  # beyond it, 64 MiB in blocks spread over the file
READ_BYTES = 1 << 20


def cache_root() -> Path:
    """$TRAINRUN_CACHE, else `trainrun/` beside the `datasets` cache (HF_DATASETS_CACHE)."""
    if os.environ.get("TRAINRUN_CACHE"):
        return Path(os.environ["TRAINRUN_CACHE"]).expanduser()
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE) / "trainrun"


def key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *map(str, parts)]).encode()).hexdigest()[:24]


def cached(folder: Path, build: Callable[[Path], None]) -> Path:
    """folder, built by build(<a temporary folder>) unless it exists: at most one process
    builds it; the others wait for it, then read it."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
        if folder.is_dir():  # another process built it while this one waited
            return folder
        for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # a crashed writer's
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            for path in [*tmp.iterdir(), tmp]:  # on disk before the name says it is complete
                rundir.fsync(path)
            os.rename(tmp, folder)
            rundir.fsync(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_split(docs, tokenizer, folder: Path, split: str, log: Callable[[str], None],
                workers: int | None = None, bar: Bar | None = None) -> dict:
    """Tokenize one split's documents into folder/<split>.bin and .offsets.npy: each
    non-blank document's ids, then the end-of-document id; encoded by `workers` threads
    (default: one per core this process may use) in chunks that are written in order, so
    that the files are the same whatever the number (trainrun.data.tokenizing). Progress:
    `bar`'s on a terminal, else a line every PROGRESS_SECONDS."""
    dtype = dtype_for(tokenizer.vocab_size)
    n_workers = workers or tokenizing.workers("auto")
    starts, n_docs, n_tokens, n_bytes = [np.zeros(1, np.int64)], 0, 0, 0
    digest = hashlib.sha256()
    total = text_bytes(docs)
    began = last = time.monotonic()
    fd = os.open(folder / f"{split}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with (bar or no_bar)(f"tokenizing {split}", total) as advance, contextlib.closing(
                tokenizing.write_chunks(docs, tokenizer, dtype, n_workers, fd)) as chunks:
            for chunk in chunks:
                signals.check()  # a start-up stop that came while `datasets` read the chunk
                digest.update(chunk.tokens)
                starts.append(n_tokens + np.cumsum(chunk.lengths))
                n_docs, n_tokens = n_docs + len(chunk.lengths), n_tokens + len(chunk.tokens)
                n_bytes += chunk.text_bytes
                if advance is not None:
                    advance(chunk.text_bytes)
                elif time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    log(f"tokenizing {split}: {rates(n_docs, n_tokens, n_bytes, last - began)}"
                        f"{time_left(n_bytes, total, last - began)}")
    finally:
        os.close(fd)  # after the writes: closing `chunks` waits for those under way
    np.save(folder / f"{split}.offsets.npy", np.concatenate(starts))
    seconds = time.monotonic() - began
    log(f"tokenized {split}: {rates(n_docs, n_tokens, n_bytes, seconds)}; "
        f"{n_workers} worker(s)")
    bin_path, offsets_path = folder / f"{split}.bin", folder / f"{split}.offsets.npy"
    return {"documents": n_docs, "tokens": n_tokens, "text_bytes": n_bytes,
            "seconds": round(seconds, 3), "bytes": bin_path.stat().st_size,
            "sha256": digest.hexdigest(), "sampled_sha256": _read(bin_path, dtype)[0],
            "offsets_bytes": offsets_path.stat().st_size,
            "offsets_sha256": _read(offsets_path, np.dtype(np.uint8), whole=True)[0]}


# A progress bar of bytes: bar(description, total bytes or None) is a context manager that
# gives the function advancing it by n bytes, or None where it shows nothing (not a
# terminal: write_split logs lines instead). trainrun.console.Console.bytes_bar is one.
Bar = Callable[[str, "int | None"], contextlib.AbstractContextManager]


@contextlib.contextmanager
def no_bar(description: str, total: int | None):
    yield None


def text_bytes(docs) -> int | None:
    """The UTF-8 bytes of the split's texts, blank ones included (what the progress and its
    ETA count against): summed from the Arrow offsets, without reading the text. None where
    `datasets` holds the split otherwise than as a table and its indices mapping."""
    try:
        import pyarrow.compute as pc

        sizes = pc.binary_length(docs.data.column("text"))
        indices = docs._indices  # train_test_split, select: the rows of the table, in order
        if indices is not None:
            sizes = sizes.take(indices.column(0))
        return int(pc.sum(sizes).as_py() or 0)
    except Exception:  # a future `datasets`' internals: the progress just has no ETA
        return None


def time_left(done: int, total: int | None, seconds: float) -> str:
    """'; 42% of 300.2 MB, about 12s left' (nothing without a total)."""
    if not total or not done:
        return ""
    left = seconds * max(total - done, 0) / done
    return f"; {min(done / total, 1):.0%} of {total / 1e6:,.1f} MB, about {left:,.0f}s left"


def rates(docs: int, tokens: int, text_bytes: int, seconds: float) -> str:
    s = max(seconds, 1e-9)
    return (f"{docs:,} documents, {tokens:,} tokens, {text_bytes / 1e6:,.1f} MB of text in "
            f"{seconds:.1f}s ({docs / s:,.0f} documents/s, {tokens / s:,.0f} tokens/s, "
            f"{text_bytes / 1e6 / s:,.1f} MB/s)")


def tokenize(docs, tokenizer, log: Callable[[str], None], workers: int | None = None,
             bar: Bar | None = None) -> Path:
    """The cache folder of these documents' tokens, written first if it is not there (by
    `workers` threads, which the folder's key leaves out: the files are the same)."""
    fingerprints = [docs[split]._fingerprint for split in docs]  # SPLITS, or `all`
    folder = cache_root() / "tokens" / key(*fingerprints, tokenizer.fingerprint())

    def build(tmp: Path) -> None:
        info = {"format": FORMAT, "dtype": dtype_for(tokenizer.vocab_size).name,
                "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint(),
                "data": fingerprints,
                "splits": {split: write_split(docs[split], tokenizer, tmp, split, log,
                                              workers, bar)
                           for split in docs}}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")

    return cached(folder, build)


def spans(size: int, itemsize: int) -> list[tuple[int, int]]:
    """(offset, length) of the blocks a sampled check reads: the whole file when it is no
    larger than SAMPLES blocks, else SAMPLES blocks from its start to its end, aligned to
    whole ids."""
    if size <= SAMPLES * SAMPLE_BYTES:
        return [(0, size)]
    starts = (i * (size - SAMPLE_BYTES) // (SAMPLES - 1) for i in range(SAMPLES))
    return [(start - start % itemsize, SAMPLE_BYTES) for start in starts]


def _read(path: Path, dtype: np.dtype, whole: bool = False) -> tuple[str, int]:
    """(sha256, highest id) of the file, or of its sampled blocks (spans): read with plain
    reads, never through a map, so that the pages stay out of the process's memory."""
    digest, top = hashlib.sha256(), 0
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        for start, length in [(0, size)] if whole else spans(size, dtype.itemsize):
            f.seek(start)
            while length > 0 and (block := f.read(min(length, READ_BYTES))):
                digest.update(block)
                length -= len(block)
                if len(block) >= dtype.itemsize:
                    top = max(top, int(np.frombuffer(block, dtype).max()))
    return digest.hexdigest(), top


def info(folder: Path) -> dict:
    """A cache folder's info.json."""
    try:
        return json.loads((folder / "info.json").read_text())
    except (OSError, ValueError) as exc:
        raise damaged(folder, f"info.json: {exc}") from None


def damaged(folder: Path, why: str) -> ConfigError:
    return ConfigError("data", f"the token cache {folder} is damaged ({why}); allowed: remove "
                               f"that folder, and the next run tokenizes the data again")


def verify(folder: Path, split: str, recorded: dict, dtype: np.dtype, vocab_size: int) -> None:
    """The split's files are those info.json describes (ConfigError naming what is not)."""
    tokens, offsets = folder / f"{split}.bin", folder / f"{split}.offsets.npy"
    for path, key in ((tokens, "bytes"), (offsets, "offsets_bytes")):
        size = path.stat().st_size if path.is_file() else None
        if size != recorded[key]:
            held = "is missing" if size is None else f"holds {size:,} bytes"
            raise damaged(folder, f"{path.name} {held}, info.json says {recorded[key]:,}")
    if _read(offsets, np.dtype(np.uint8), whole=True)[0] != recorded["offsets_sha256"]:
        raise damaged(folder, f"{offsets.name} does not match its sha256 in info.json")
    whole = recorded["bytes"] <= VERIFY_ALL
    digest, top = _read(tokens, dtype, whole)
    if digest != recorded["sha256" if whole else "sampled_sha256"]:
        what = "its sha256" if whole else "the sha256 of its sampled blocks"
        raise damaged(folder, f"{tokens.name} does not match {what} in info.json")
    if recorded["bytes"] and top >= vocab_size:
        raise damaged(folder, f"{tokens.name} holds the id {top}, beyond the tokenizer's "
                              f"{vocab_size} ids")


def open_split(folder: Path, split: str,
               vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens and document offsets, mapped read-only (pages are read on use),
    once verify() has found them as they were written; ids must be below vocab_size (the
    tokenizer's; default: info.json's)."""
    described = info(folder)
    try:
        dtype = np.dtype(described["dtype"])
        recorded = described["splits"][split]
        verify(folder, split, recorded, dtype, vocab_size or described["vocab_size"])
        path = folder / f"{split}.bin"
        tokens = np.memmap(path, dtype=dtype, mode="r") if recorded["bytes"] else np.zeros(0, dtype)
        offsets = np.load(folder / f"{split}.offsets.npy", mmap_mode="r")
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged(folder, f"info.json or the offsets are not trainrun's: {exc!r}") from None
    if offsets[0] != 0 or offsets[-1] != len(tokens):
        raise damaged(folder, f"{split}.offsets.npy does not end at the {len(tokens):,} tokens")
    return tokens, offsets
