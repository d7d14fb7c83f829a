"""Data: documents read through `datasets`, byte-level tokens, and fixed-length sequences.

Every source yields two splits of documents (train, validation). Each document becomes its
UTF-8 bytes (ids 0..255) followed by an end-of-document id (256); the tokenized splits are
cached by `datasets`, so sweeps and resumed runs do not tokenize again. With packing the
documents are concatenated and cut into windows of seq_len + 1 tokens; without it each
document is one sequence, truncated and padded, with padding excluded from the loss.
"""

from __future__ import annotations

import codecs
import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive
from trainrun.textcheck import check_encoding, require_text

VOCAB_SIZE = 257
EOT = 256  # end of document; also the input id at padded positions
IGNORE = -100  # target id excluded from the loss (padding)
SPLIT_SEED = 0  # the train/validation split never depends on trainer.seed


@dataclass
class DataConfig:
    batch_size: int = MISSING  # sequences per micro-batch, per process
    seq_len: int = MISSING  # tokens per sequence
    packing: bool = MISSING  # concatenate documents into windows (false: one per sequence)
    val_fraction: float = MISSING  # documents held out when the source has no validation split

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.batch_size", self.batch_size)
        require_positive(f"{prefix}.seq_len", self.seq_len)
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError(f"{prefix}.val_fraction",
                              f"got {self.val_fraction}; allowed: 0 < val_fraction <= 0.5")

    def documents(self):
        """A `datasets.DatasetDict` with splits `train` and `validation` and a `text` column."""
        raise NotImplementedError


@dataclass
class BuiltinDataConfig(DataConfig):
    """The Python standard library's own top-level modules: real text on every machine."""

    def documents(self):
        import datasets

        files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        # CPython's sources are UTF-8; checking ~5 MB costs ~30 ms, and a Python whose are
        # not gets one line instead of a traceback
        require_text("data", files, "utf-8", "data=text for other data")
        ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
        return _hold_out(ds, self.val_fraction)


@dataclass
class TextDataConfig(DataConfig):
    """Local files by extension: .txt (a document per line), .jsonl/.json, .csv, .parquet
    (a document per row, its text in `text_column`); all but Parquet are text in `encoding`."""

    files: str = MISSING  # glob patterns, comma-separated
    text_column: str = MISSING
    encoding: str = MISSING  # a Python codec name; Parquet files are binary and ignore it

    def paths(self) -> list[str]:
        patterns = [p.strip() for p in self.files.split(",") if p.strip()]
        return sorted({f for p in patterns for f in glob.glob(os.path.expanduser(p), recursive=True)
                       if os.path.isfile(f)})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_encoding(f"{prefix}.encoding", self.encoding)
        paths = self.paths()
        if not paths:
            raise ConfigError(f"{prefix}.files", f"{self.files!r} matches no file")
        if all(_is_empty(p) for p in paths):
            raise ConfigError(f"{prefix}.files", f"{self.files!r} matches only empty files")
        kinds = {_BUILDERS.get(Path(p).suffix.lower()) for p in paths}
        if None in kinds or len(kinds) > 1:
            raise ConfigError(
                f"{prefix}.files",
                f"{self.files!r}: the files must share one extension of {', '.join(_BUILDERS)}",
            )

    def documents(self):
        import datasets

        paths = self.paths()
        builder = _BUILDERS[Path(paths[0]).suffix.lower()]
        encoding = {}
        if builder != "parquet":
            require_text("data.files", paths, self.encoding, _allowed(self.encoding))
            encoding = {"encoding": self.encoding}  # the text, json and csv builders' key
        ds = datasets.load_dataset(builder, data_files=paths, split="train", **encoding)
        return _hold_out(_text_column(ds, self.text_column, "data.text_column"), self.val_fraction)


@dataclass
class HFDataConfig(DataConfig):
    """`datasets.load_dataset(path, name)`: the hub (network or local cache) or a local dir."""

    path: str = MISSING
    name: str | None = None  # the data set's configuration
    train_split: str = MISSING
    val_split: str | None = None  # null: hold out val_fraction of train_split
    text_column: str = MISSING

    def documents(self):
        import datasets

        train = _text_column(self._split(self.train_split, "data.train_split"),
                             self.text_column, "data.text_column")
        if self.val_split is None:
            return _hold_out(train, self.val_fraction)
        val = _text_column(self._split(self.val_split, "data.val_split"),
                           self.text_column, "data.text_column")
        return datasets.DatasetDict(train=train, validation=val)

    def _split(self, split: str, key: str):
        """One split, with the usual ways of not finding it as one ConfigError line."""
        import datasets
        from datasets.exceptions import DatasetNotFoundError

        try:
            return datasets.load_dataset(self.path, self.name, split=split)
        except (FileNotFoundError, DatasetNotFoundError, ConnectionError) as exc:
            why = str(exc).splitlines()[0].rstrip(".")
            raise ConfigError("data.path", f"{self.path!r}: {why}; allowed: a local folder, or "
                              f"a data set on the hub (network or local cache)") from None
        except ValueError as exc:  # datasets' "Unknown split ..."
            if "split" not in str(exc).lower():
                raise
            raise ConfigError(key, f"{split!r}: {str(exc).splitlines()[0]}") from None
        except Exception as exc:  # datasets wraps the UnicodeDecodeError of a builder
            if not isinstance(exc.__cause__, UnicodeDecodeError):
                raise
            allowed = "UTF-8 text files (or data=text with data.encoding=<codec>)"
            if os.path.isdir(self.path):  # the error names no file: find the first bad byte
                require_text("data.path", _text_files(self.path), "utf-8", allowed)
            raise ConfigError("data.path", f"{self.path!r}: {exc.__cause__}; allowed: {allowed}"
                              ) from None


DATA = {"builtin": BuiltinDataConfig, "text": TextDataConfig, "hf": HFDataConfig}
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _allowed(encoding: str) -> str:
    if codecs.lookup(encoding).name == "utf-8":
        return "UTF-8 text files, or data.encoding=<codec> for another encoding"
    return f"text files in {encoding} (data.encoding), or data.encoding=<codec> for another"


def _text_files(folder: str) -> list[str]:
    """The files of a folder that `datasets` would read as text, as it does: by extension,
    hidden ones left out."""
    return sorted(str(p) for p in Path(folder).rglob("*")
                  if p.suffix.lower() in _BUILDERS and p.suffix.lower() != ".parquet"
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _is_empty(path: str) -> bool:
    """No byte at all, or (a text-like file) nothing but white space; reads only as far as
    the first character that is not white space."""
    if Path(path).suffix.lower() == ".parquet":
        return os.path.getsize(path) == 0
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


def _text_column(ds, column: str, key: str):
    if column not in ds.column_names:
        raise ConfigError(key, f"no column {column!r}; the data has {', '.join(ds.column_names)}")
    return ds.select_columns([column]).rename_column(column, "text") if column != "text" else ds


def _hold_out(ds, val_fraction: float):
    import datasets

    ds = ds.select_columns(["text"])
    if len(ds) < 2:
        raise ConfigError("data", f"{len(ds)} document(s); at least 2 are needed to hold one out")
    n_val = max(1, round(val_fraction * len(ds)))
    split = ds.train_test_split(test_size=n_val, seed=SPLIT_SEED)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def encode(batch: dict) -> dict:
    """Byte-level tokenization: UTF-8 bytes then EOT; empty documents are dropped."""
    ids = [np.append(np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16), EOT)
           for t in batch["text"] if t and t.strip()]
    return {"ids": ids}


def decode(ids) -> str:
    """The text of byte ids; EOT, IGNORE and any other id outside 0..255 are left out."""
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class Sequences:
    """Fixed-length training sequences; `batch(indices)` -> inputs, targets (B, T) int64."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seq_len: int, packing: bool):
        self.tokens, self.offsets, self.seq_len, self.packing = tokens, offsets, seq_len, packing
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
        if self.packing:
            rows = self.tokens[np.asarray(indices)[:, None] * T + cols].astype(np.int64)
            x, y = rows[:, :-1], rows[:, 1:]
        else:
            starts, lengths = self.starts[indices], self.lengths[indices]
            real = cols < lengths[:, None]
            pos = np.where(real, starts[:, None] + cols, 0)
            rows = np.where(real, self.tokens[pos], EOT).astype(np.int64)
            x = rows[:, :-1]
            y = np.where(real[:, 1:], rows[:, 1:], IGNORE)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def num_targets(self, indices: np.ndarray) -> int:
        """Target tokens (those the loss counts) in the sequences `indices`."""
        if self.packing:
            return len(indices) * self.seq_len
        return int((self.lengths[indices] - 1).sum())


def tokenize(cfg: DataConfig):
    """The documents' splits as a `datasets.DatasetDict` with one column, `ids`.

    `Dataset.map` writes the result into the `datasets` cache (next to the source's own
    cache files), keyed by the fingerprint of the source and of `encode`; the next run on
    the same data reads it back instead of tokenizing again.
    """
    import datasets

    datasets.disable_progress_bars()  # they write carriage returns; the run logs its own lines
    datasets.logging.set_verbosity_error()
    docs = cfg.documents()
    return datasets.DatasetDict({
        split: docs[split].map(encode, batched=True, remove_columns=docs[split].column_names,
                               features=datasets.Features(ids=datasets.Sequence(
                                   datasets.Value("uint16"))))
        for split in ("train", "validation")
    })


def load(cfg: DataConfig) -> dict[str, Sequences]:
    """The tokenized splits as Sequences, tokenization cached by `datasets`."""
    tokenized_splits = tokenize(cfg)
    out = {}
    for split in ("train", "validation"):
        tokenized = tokenized_splits[split]
        column = tokenized.data.column("ids").combine_chunks()
        tokens = column.flatten().to_numpy(zero_copy_only=False).astype(np.uint16, copy=False)
        offsets = column.offsets.to_numpy()
        seqs = Sequences(tokens, offsets - offsets[0], cfg.seq_len, cfg.packing)
        if len(seqs) == 0:
            raise ConfigError(
                "data", f"the {split} split has no sequence of data.seq_len={cfg.seq_len} tokens"
            )
        out[split] = seqs
    return out
