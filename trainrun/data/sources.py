"""Data sources: the documents of a run, read through `datasets`, as two splits (train,
validation) with one column, `text`.

A source with a validation split of its own uses it; otherwise a fixed `val_fraction` of
the documents is held out, with a seed of its own. `max_documents` caps each split, for quick
runs on a large corpus.

A `.txt` file is one document by default (`data.sample_by=file`: its text as it is, newlines
included, so that a model learns to write them), or one per paragraph or line. Whole files
are held out when they are enough for val_fraction of them to be one at least; fewer (a
single corpus file, as nanoGPT's input.txt) give validation the last val_fraction of each
file's text instead, from a line start.

Local files are known by their content, not only by what `datasets` looks at (their paths and
modification times): their sha256, taken while the text check reads them, keys the folder
where `datasets` keeps its copy of them and is part of the documents' fingerprint, so that a
file edited at the same size and time is read again and tokenized anew.
"""

from __future__ import annotations

import codecs
import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING

from trainrun.data.stream import Source, StreamFailed, StreamingKeys, of_iterable
from trainrun.data.tokenizing import check_workers
from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.registry import options_of, register
from trainrun.textcheck import (
    check_encoding,
    fingerprint,
    open_regular,
    require_regular,
    require_text,
)

SPLIT_SEED = 0  # the train/validation split never depends on trainer.seed
# data.sample_by: what a document of a .txt file is, and the name `datasets`' text builder
# gives it; None: its default, not passed, so that runs from before the key keep their
# `datasets` fingerprint and token cache
SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": None}


@dataclass
class DataConfig:
    # what the data is for: lm (documents, a decoder's) or translation (pairs: parallel.py);
    # a model family reads the data of its own task (ModelConfig.task)
    task: ClassVar[str] = "lm"

    batch_size: int = MISSING  # sequences per micro-batch, per process
    seq_len: int = MISSING  # tokens per sequence
    packing: bool = MISSING  # concatenate documents into windows (false: one per sequence)
    val_fraction: float = MISSING  # documents held out when the source has no validation split
    max_documents: int | None = None  # at most this many documents per split (null: all)
    # attention within each document of a packed window, positions from 0 in each (a
    # decoder's; docs/data.md, Document masking); with packing=false a no-op
    document_mask: bool = False
    # threads that tokenize: auto (one per core this process may use) or N; the token files
    # are the same whatever the number, so it is in no cache key (docs/data.md, Token storage)
    tokenize_workers: str = "auto"

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.batch_size", self.batch_size)
        check_workers(f"{prefix}.tokenize_workers", self.tokenize_workers)
        require_positive(f"{prefix}.seq_len", self.seq_len)
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError(f"{prefix}.val_fraction",
                              f"got {self.val_fraction}; allowed: 0 < val_fraction <= 0.5")
        if self.max_documents is not None:
            require_positive(f"{prefix}.max_documents", self.max_documents)

    def splits(self, whole: bool = False):
        """documents(whole), each split capped at max_documents (its first ones)."""
        docs = self.documents(whole)
        if self.max_documents is not None:
            for split in list(docs):
                if len(docs[split]) > self.max_documents:
                    docs[split] = docs[split].select(range(self.max_documents))
        return docs

    def describe(self) -> str:
        """Where the validation split comes from, for the run's log."""
        return f"validation: {self.val_fraction:g} of the documents held out"

    def documents(self, whole: bool = False):
        """A `datasets.DatasetDict` with splits `train` and `validation` and a `text` column;
        whole: one split, `all`, of every document in the source's order, none held out (a
        data set with splits of its own: those of data.train_split), for data scored whole."""
        raise NotImplementedError


@register("data", "builtin")
@dataclass
class BuiltinDataConfig(DataConfig):
    """The Python standard library's own top-level modules: real text on every machine."""

    def documents(self, whole: bool = False):
        import datasets

        files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        # CPython's sources are UTF-8; checking ~5 MB costs ~30 ms, and a Python whose are
        # not gets one line instead of a traceback
        content = require_text("data", files, "utf-8", "data=text for other data")
        ds = datasets.load_dataset("text", data_files=files, split="train", sample_by="document",
                                   cache_dir=_cache_dir(content))
        return _hold_out(ds, self.val_fraction, content, whole)


@register("data", "text")
@dataclass
class TextDataConfig(StreamingKeys, DataConfig):
    """Local files by extension: .txt (a document per file, paragraph or line: sample_by),
    .jsonl/.json, .csv, .parquet (a document per row, its text in `text_column`); all but
    Parquet are text in `encoding`."""

    files: Any = MISSING  # a glob pattern, or a list of them: data.files='[a.txt,b/*.txt]'
    text_column: str = MISSING
    encoding: str = MISSING  # a Python codec name; Parquet files are binary and ignore it
    sample_by: str = MISSING  # file | paragraph | line: a document of a .txt file (SAMPLE_BY)

    def patterns(self) -> list[str]:
        if isinstance(self.files, str):
            return [self.files.strip()] if self.files.strip() else []
        return [str(p).strip() for p in self.files if str(p).strip()]

    def paths(self) -> list[str]:
        """The files the patterns match (a named pipe or a device too, to be refused; not
        directories, which `**` matches, nor links to nothing)."""
        return sorted({f for p in self.patterns()
                       for f in glob.glob(os.path.expanduser(p), recursive=True)
                       if os.path.exists(f) and not os.path.isdir(f)})

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check_encoding(f"{prefix}.encoding", self.encoding)
        require_in(f"{prefix}.sample_by", self.sample_by, tuple(SAMPLE_BY))
        if not isinstance(self.files, (str, list, tuple)):
            raise ConfigError(f"{prefix}.files", f"got {self.files!r}; allowed: a glob pattern "
                              f"or a list of them, data.files='[a.txt,b/*.txt]'")
        folders = [p for p in self.patterns() if os.path.isdir(os.path.expanduser(p))]
        if folders:
            raise ConfigError(f"{prefix}.files", f"{folders[0]!r} is a directory; allowed: "
                              f"files or glob patterns, e.g. data.files='{folders[0].rstrip('/')}"
                              f"/*.txt' (or '**/*.txt' with its subdirectories)")
        paths = self.paths()
        if not paths:
            raise ConfigError(f"{prefix}.files", f"{self.files!r} matches no file")
        require_regular(f"{prefix}.files", paths, "regular files (a named pipe, socket or "
                                                  "device is never read)")
        if all(_is_empty(p) for p in paths):
            raise ConfigError(f"{prefix}.files", f"{self.files!r} matches only empty files")
        kinds = {_BUILDERS.get(Path(p).suffix.lower()) for p in paths}
        if None in kinds or len(kinds) > 1:
            raise ConfigError(
                f"{prefix}.files",
                f"{self.files!r}: the files must share one extension of {', '.join(_BUILDERS)}",
            )

    def describe(self) -> str:
        if not self._tails():
            return super().describe()
        return (f"validation: the last {self.val_fraction:g} of each file's text, from a line "
                f"start (data.sample_by=file: {len(self.paths())} file(s), too few to hold "
                f"{self.val_fraction:g} of them out whole)")

    def _tails(self) -> bool:
        """Whether validation is the end of each file rather than whole files held out."""
        paths = self.paths()
        return (self.sample_by == "file" and _BUILDERS[Path(paths[0]).suffix.lower()] == "text"
                and self.val_fraction * len(paths) < 1)

    def documents(self, whole: bool = False):
        import datasets

        paths = self.paths()
        builder = _BUILDERS[Path(paths[0]).suffix.lower()]
        options = {}
        if builder != "parquet":
            content = require_text("data.files", paths, self.encoding, _allowed(self.encoding))
            options = {"encoding": self.encoding}  # the text, json and csv builders' key
        else:
            content = fingerprint(paths)
        if builder == "text" and SAMPLE_BY[self.sample_by] is not None:
            options["sample_by"] = SAMPLE_BY[self.sample_by]
        ds = datasets.load_dataset(builder, data_files=paths, split="train",
                                   cache_dir=_cache_dir(content), **options)
        ds = _text_column(ds, self.text_column, "data.text_column")
        if self._tails() and not whole:
            return _hold_out_tails(ds, self.val_fraction, content)
        return _hold_out(ds, self.val_fraction, content, whole)

    def stream_sources(self) -> tuple[Source, None]:
        """The files as a stream, a shard per file (Parquet: as `datasets` cuts them); no
        validation split of their own."""
        import datasets

        paths = self.paths()
        builder = _BUILDERS[Path(paths[0]).suffix.lower()]
        options = {} if builder == "parquet" else {"encoding": self.encoding}
        if builder == "text" and SAMPLE_BY[self.sample_by] is not None:
            options["sample_by"] = SAMPLE_BY[self.sample_by]
        if builder != "parquet":  # the whole files are read only as the stream goes
            require_text_prefix("data.files", paths, self.encoding, _allowed(self.encoding))
        ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True,
                                   **options)
        identity = {"files": [_stat(p) for p in paths], "options": options}

        def undecodable(k: int, error: UnicodeDecodeError) -> StreamFailed:
            where = paths[k] if ds.n_shards == len(paths) else f"shard {k} of the files"
            return StreamFailed("data.encoding", f"{where} is not {_codec_name(self.encoding)} "
                                f"text (byte 0x{error.object[error.start]:02x}: {error.reason}); "
                                f"allowed: "
                                f"{_allowed(self.encoding)}")

        return of_iterable(ds, self.text_column, "data.text_column", identity,
                           f"{len(paths)} file(s)", undecodable), None


@register("data", "hf")
@dataclass
class HFDataConfig(StreamingKeys, DataConfig):
    """`datasets.load_dataset(path, name)`: the hub (network or local cache) or a local dir."""

    path: str = MISSING
    name: str | None = None  # the data set's configuration
    train_split: str = MISSING
    val_split: str | None = None  # null: the source's `validation` split, else held out
    text_column: str = MISSING

    def documents(self, whole: bool = False):
        import datasets

        content = None  # a hub data set: `datasets` knows it by its revision
        folder = os.path.expanduser(self.path)
        if os.path.isdir(folder):
            require_regular("data.path", _data_files(folder), "a folder of regular files (a "
                            "named pipe, socket or device is never read)")
            content = fingerprint(_folder_files(folder), folder)
        available = self._load(None, "data.path", content)
        val_split = self.val_split
        if val_split is None and "validation" in available and self.train_split != "validation":
            val_split = "validation"
        train = _text_column(self._pick(available, self.train_split, "data.train_split"),
                             self.text_column, "data.text_column")
        if whole:
            return datasets.DatasetDict(all=_text_only(train, content))
        if val_split is None:
            return _hold_out(train, self.val_fraction, content)
        val = _text_column(self._pick(available, val_split, "data.val_split"),
                           self.text_column, "data.text_column")
        return datasets.DatasetDict(train=_text_only(train, content),
                                    validation=_text_only(val, content))

    def stream_sources(self) -> tuple[Source, Source | None]:
        """data.train_split as a stream, and data.val_split (or the source's `validation`
        split) if there is one."""
        available = self._load(None, "data.path", streaming=True)
        val_split = self.val_split
        if val_split is None and "validation" in available and self.train_split != "validation":
            val_split = "validation"
        folder = os.path.expanduser(self.path)
        files = [_stat(p) for p in _folder_files(folder)] if os.path.isdir(folder) else None
        allowed = "UTF-8 text files (or data=text with data.encoding=<codec>)"
        if files is not None:
            require_text_prefix("data.path", _text_files(folder), "utf-8", allowed)

        def undecodable(k: int, error: UnicodeDecodeError) -> StreamFailed:
            return StreamFailed("data.path", f"shard {k} of {self.path!r} is not UTF-8 text "
                                f"(byte 0x{error.object[error.start]:02x}: {error.reason}); "
                                f"allowed: {allowed}")

        sources = []
        for split, key in ((self.train_split, "data.train_split"), (val_split, "data.val_split")):
            identity = {"path": self.path, "name": self.name, "split": split, "files": files}
            sources.append(None if split is None else of_iterable(
                self._pick(available, split, key), self.text_column, "data.text_column",
                identity, f"{self.path} split {split!r}", undecodable))
        return sources[0], sources[1]

    def describe(self) -> str:
        return (f"validation: split {self.val_split!r}" if self.val_split is not None else
                f"validation: split 'validation' if {self.path} has one, else "
                f"{self.val_fraction:g} of {self.train_split!r} held out")

    def _pick(self, available, split: str, key: str):
        if split not in available:
            raise ConfigError(key, f"{split!r}: no such split in {self.path}; it has "
                                   f"{', '.join(available)}")
        return available[split]

    def _load(self, split: str | None, key: str, content: str | None = None,
              streaming: bool = False):
        """The data set's splits (a DatasetDict), with the usual ways of not finding it as one
        ConfigError line; a hub name fails at once when the hub cannot be reached. `content`:
        a local folder's fingerprint."""
        import datasets
        from datasets.exceptions import DatasetNotFoundError

        from trainrun.data.hub import offline_unless_reachable

        try:
            with offline_unless_reachable(self.path):
                return datasets.load_dataset(self.path, self.name, split=split,
                                             cache_dir=_cache_dir(content), streaming=streaming)
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


DATA: dict[str, type[DataConfig]] = options_of("data")  # each class registers itself
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _allowed(encoding: str) -> str:
    if codecs.lookup(encoding).name == "utf-8":
        return "UTF-8 text files, or data.encoding=<codec> for another encoding"
    return f"text files in {encoding} (data.encoding), or data.encoding=<codec> for another"


def _codec_name(encoding: str) -> str:
    return "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding


PREFIX = 1 << 20  # bytes of each file a stream's start-up checks


def require_text_prefix(key: str, paths: list[str], encoding: str, allowed: str) -> None:
    """ConfigError on `key` for the first of `paths` whose first PREFIX bytes are not text
    in `encoding` (as require_text says it): a stream's files may be too large to read whole
    at start-up; a bad byte further on fails the run when the stream meets it (StreamFailed)."""
    for path in paths:
        with open_regular(path) as f:
            block = f.read(PREFIX)
            whole = len(block) < PREFIX or not f.read(1)
        what = None
        nul = block.find(b"\0") if "\0".encode(encoding) == b"\0" else -1
        try:  # a character cut by the prefix's end is no error
            codecs.getincrementaldecoder(encoding)().decode(block[:nul] if nul >= 0 else block,
                                                            final=whole or nul >= 0)
        except UnicodeDecodeError as exc:
            what = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        except UnicodeError as exc:
            what = str(exc)
        if what is None and nul >= 0:
            what = f"NUL byte at offset {nul}"
        if what is not None:
            raise ConfigError(key, f"{path} is not {_codec_name(encoding)} text ({what}); "
                                   f"allowed: {allowed}")


def _cache_dir(content: str | None) -> str | None:
    """Where `datasets` keeps its copy of local files whose content fingerprint is `content`
    (None: its own cache): one folder per content, since `datasets` itself tells files apart
    by their paths and modification times only."""
    if content is None:
        return None
    from trainrun.data.storage import cache_root

    return str(cache_root() / "documents" / content[:24])


def _stat(path: str) -> list:
    """A file as a stream's record names it: path, size and modification time (its content
    is not read: it may be larger than a start-up should read)."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _folder_files(folder: str) -> list[str]:
    """Every file of a data=hf folder but hidden ones: any of them may change what `datasets`
    reads (a README.md can name the splits' files)."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _data_files(folder: str) -> list[str]:
    """The entries of a folder that `datasets` would read, as it picks them: by extension,
    hidden ones left out; directories and links to nothing are not files."""
    return sorted(str(p) for p in Path(folder).rglob("*")
                  if p.suffix.lower() in _BUILDERS and p.exists() and not p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _text_files(folder: str) -> list[str]:
    """The files of a folder that `datasets` would read as text."""
    return [p for p in _data_files(folder) if Path(p).suffix.lower() != ".parquet"]


def _is_empty(path: str) -> bool:
    """No byte at all, or (a text-like file) nothing but white space; reads only as far as
    the first character that is not white space."""
    if Path(path).suffix.lower() == ".parquet":
        return os.path.getsize(path) == 0
    with open_regular(path) as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


def _text_column(ds, column: str, key: str):
    if column not in ds.column_names:
        raise ConfigError(key, f"no column {column!r}; the data has {', '.join(ds.column_names)}")
    return ds.select_columns([column]).rename_column(column, "text") if column != "text" else ds


def _text_only(ds, content: str | None):
    """The `text` column, its fingerprint made from the files' content fingerprint too."""
    if content is None:
        return ds.select_columns(["text"])
    from trainrun.data.storage import key

    return ds.select_columns(["text"], new_fingerprint=key(ds._fingerprint, content))


def _hold_out_tails(ds, val_fraction: float, content: str | None):
    """Each document (a file's text) cut in two: validation is its last val_fraction of
    characters, begun at the start of the line that holds that point (or at the point, in
    a file's first line); training the rest."""
    import datasets

    from trainrun.data.storage import key

    parts = {"train": [], "validation": []}
    for text in ds["text"]:
        at = len(text) - max(1, round(val_fraction * len(text)))
        cut = text.rfind("\n", 0, at) + 1 or at
        parts["train"].append(text[:cut])
        parts["validation"].append(text[cut:])
    base = key(ds._fingerprint, content, "tails", val_fraction)
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": texts}).select_columns(
            ["text"], new_fingerprint=key(base, split)) for split, texts in parts.items()})


def _hold_out(ds, val_fraction: float, content: str | None, whole: bool = False):
    import datasets

    ds = _text_only(ds, content)
    if whole:  # nothing held out
        return datasets.DatasetDict(all=ds)
    if len(ds) < 2:
        raise ConfigError("data", f"{len(ds)} document(s); at least 2 are needed to hold one out")
    n_val = max(1, round(val_fraction * len(ds)))
    split = ds.train_test_split(test_size=n_val, seed=SPLIT_SEED)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])
