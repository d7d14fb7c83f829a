"""Token storage: each split tokenized once into a flat token file (uint16 when the
vocabulary fits, else uint32) and its document offsets, in a cache folder keyed by the
fingerprints of the documents and the tokenizer; every process opens the files read-only
(sequences.py reads them).

A cache folder appears whole or not at all: it is written under another name while an
exclusive lock is held, then renamed into place. Two runs (or ranks) starting together
wait for each other instead of tokenizing twice, and a crash leaves only a temporary folder
that the next writer removes. Layout (README "Data"):

    <cache root>/tokens/<key>/{train,validation}.bin          tokens, end of document after each
    <cache root>/tokens/<key>/{train,validation}.offsets.npy  int64: where each document starts
    <cache root>/tokens/<key>/info.json                       sizes and fingerprints
    <cache root>/tokenizers/<key>/tokenizer.json              tokenizer=bpe, trained once
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainrun import signals

FORMAT = 1  # of the files below; part of every key
BATCH = 1000  # documents per encode_batch call
PROGRESS_SECONDS = 10.0
SPLITS = ("train", "validation")


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
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_split(docs, tokenizer, folder: Path, split: str, log: Callable[[str], None]) -> dict:
    """Tokenize one split's documents into folder/<split>.bin and .offsets.npy: each
    non-blank document's ids, then the end-of-document id."""
    dtype, eot = dtype_for(tokenizer.vocab_size), np.array([tokenizer.eot])
    starts, n_docs, n_tokens, n_bytes = [np.zeros(1, np.int64)], 0, 0, 0
    began = last = time.monotonic()
    with open(folder / f"{split}.bin", "wb") as out:
        for batch in docs.iter(batch_size=BATCH):
            signals.check()  # a start-up stop that came while `datasets` read the batch
            texts = [t for t in batch["text"] if t and t.strip()]
            if not texts:
                continue
            ids = tokenizer.encode_batch(texts)
            np.concatenate([part for a in ids for part in (a, eot)]).astype(dtype).tofile(out)
            lengths = np.fromiter((len(a) + 1 for a in ids), np.int64, len(ids))
            starts.append(n_tokens + np.cumsum(lengths))
            n_docs, n_tokens = n_docs + len(ids), n_tokens + int(lengths.sum())
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            if time.monotonic() - last >= PROGRESS_SECONDS:
                last = time.monotonic()
                log(f"tokenizing {split}: {rates(n_docs, n_tokens, n_bytes, last - began)}")
    np.save(folder / f"{split}.offsets.npy", np.concatenate(starts))
    seconds = time.monotonic() - began
    log(f"tokenized {split}: {rates(n_docs, n_tokens, n_bytes, seconds)}")
    return {"documents": n_docs, "tokens": n_tokens, "text_bytes": n_bytes,
            "seconds": round(seconds, 3)}


def rates(docs: int, tokens: int, text_bytes: int, seconds: float) -> str:
    s = max(seconds, 1e-9)
    return (f"{docs:,} documents, {tokens:,} tokens, {text_bytes / 1e6:,.1f} MB of text in "
            f"{seconds:.1f}s ({docs / s:,.0f} documents/s, {tokens / s:,.0f} tokens/s, "
            f"{text_bytes / 1e6 / s:,.1f} MB/s)")


def tokenize(docs, tokenizer, log: Callable[[str], None]) -> Path:
    """The cache folder of these documents' tokens, written first if it is not there."""
    fingerprints = [docs[split]._fingerprint for split in SPLITS]
    folder = cache_root() / "tokens" / key(*fingerprints, tokenizer.fingerprint())

    def build(tmp: Path) -> None:
        info = {"format": FORMAT, "dtype": dtype_for(tokenizer.vocab_size).name,
                "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint(),
                "data": fingerprints,
                "splits": {split: write_split(docs[split], tokenizer, tmp, split, log)
                           for split in SPLITS}}
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")

    return cached(folder, build)


def open_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens and document offsets, mapped read-only (pages are read on use)."""
    info = json.loads((folder / "info.json").read_text())
    path = folder / f"{split}.bin"
    dtype = np.dtype(info["dtype"])
    tokens = (np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size
              else np.zeros(0, dtype))
    return tokens, np.load(folder / f"{split}.offsets.npy", mmap_mode="r")
