"""data=parallel: sentence pairs for translation, as a `datasets.DatasetDict` with splits
train, validation (and test, when given) and the columns `source` and `target`.

Three ways to give them:

    source_files / target_files   line-aligned text files, line i of one the translation
                                  of line i of the other (valid_* and test_* likewise)
    files                         JSON lines (or .json / .parquet) with a `translation`
                                  column {src_lang: ..., tgt_lang: ...}, as on the hub
    path                          a `datasets` source (hub or local folder) with that column

A pair with an empty side is dropped before tokenizing and counted in the log (the token
files keep only non-blank documents, and a pair needs both of its sides). Without a
validation split of their own, a fixed val_fraction of the pairs is held out, with a seed of
its own, as for language modelling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from trainrun.data.sources import (
    SPLIT_SEED,
    DataConfig,
    HFDataConfig,
    TextDataConfig,
    _cache_dir,
)
from trainrun.errors import ConfigError, require_positive
from trainrun.registry import register
from trainrun.textcheck import check_encoding, open_regular, require_regular, require_text

SIDES = ("source", "target")


@register("data", "parallel")
@dataclass
class ParallelDataConfig(DataConfig):
    """Sentence pairs: the data of a translation model (model=transformer_*)."""

    task: ClassVar[str] = "translation"

    source_files: Any = None  # glob(s) of line-aligned text files: data.source_files=train.de
    target_files: Any = None  # the same number of lines: data.target_files=train.en
    valid_source_files: Any = None  # null: val_fraction of the pairs held out
    valid_target_files: Any = None
    test_source_files: Any = None  # a test split, for trainrun-eval --split test
    test_target_files: Any = None
    files: Any = None  # or: .jsonl/.json/.parquet file(s) with a translation column
    path: str | None = None  # or: a `datasets` source (hub name or local folder)
    name: str | None = None  # its configuration
    train_split: str = "train"
    val_split: str | None = None  # null: the source's `validation` split, else held out
    test_split: str | None = None  # null: the source's `test` split, if it has one
    translation_column: str = "translation"
    src_lang: str | None = None  # the key of the source side in the translation column
    tgt_lang: str | None = None
    encoding: str = "utf-8"  # of the text files
    max_source_len: int | None = None  # tokens, end of sentence included; null: data.seq_len
    max_target_len: int | None = None  # longer pairs are dropped (and counted)
    max_tokens: int | None = None  # a micro-batch: pairs of similar length up to this many
    # tokens, padding counted (null: data.batch_size pairs)

    def limits(self) -> tuple[int, int]:
        """(max_source_len, max_target_len), data.seq_len where null."""
        return (self.max_source_len or self.seq_len, self.max_target_len or self.seq_len)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.packing:
            raise ConfigError(f"{prefix}.packing", "true; allowed: false (a pair is never "
                                                   "packed with another)")
        if self.document_mask:
            raise ConfigError(f"{prefix}.document_mask", "true; allowed: false (a pair is one "
                                                         "source and one target, never packed "
                                                         "with another: there are no documents "
                                                         "to keep apart)")
        check_encoding(f"{prefix}.encoding", self.encoding)
        for key in ("max_source_len", "max_target_len", "max_tokens"):
            if getattr(self, key) is not None:
                require_positive(f"{prefix}.{key}", getattr(self, key))
        for key, value in zip(("max_source_len", "max_target_len"), self.limits(), strict=True):
            if value < 2:
                raise ConfigError(f"{prefix}.{key}", f"{value} tokens; allowed: 2 or more (a "
                                                     f"word and the end of the sentence)")
        longest = max(self.limits())
        if self.max_tokens is not None and self.max_tokens < longest:
            raise ConfigError(f"{prefix}.max_tokens", f"{self.max_tokens} is less than the "
                              f"longest pair's {longest} tokens (max_source_len, "
                              f"max_target_len); allowed: at least {longest}")
        given = [k for k in ("source_files", "files", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"{prefix}.source_files",
                              f"{'none' if not given else ' and '.join(given)} given; allowed: "
                              f"one of data.source_files + data.target_files (line-aligned "
                              f"text), data.files (JSON lines with a {self.translation_column} "
                              f"column) or data.path (a `datasets` source)")
        if self.source_files is not None:
            for kind in ("", "valid_", "test_"):
                src, tgt = getattr(self, f"{kind}source_files"), getattr(self, f"{kind}target_files")
                if (src is None) != (tgt is None):
                    missing = f"{kind}target_files" if tgt is None else f"{kind}source_files"
                    raise ConfigError(f"{prefix}.{missing}", f"null while data.{kind}"
                                      f"{'source' if tgt is None else 'target'}_files is set; "
                                      f"allowed: the other side's line-aligned files")
                for side, value in (("source", src), ("target", tgt)):
                    if value is not None:
                        _paths(f"{prefix}.{kind}{side}_files", value)
        else:
            for key in ("src_lang", "tgt_lang"):
                if not getattr(self, key):
                    raise ConfigError(f"{prefix}.{key}", f"null; allowed: a language key of the "
                                                         f"{self.translation_column} column, "
                                                         f"e.g. data.src_lang=de data.tgt_lang=en")
            if self.files is not None:
                paths = _paths(f"{prefix}.files", self.files)
                bad = [p for p in paths if os.path.splitext(p)[1].lower() not in _BUILDERS]
                if bad:
                    raise ConfigError(f"{prefix}.files", f"{bad[0]}: allowed: "
                                                         f"{', '.join(_BUILDERS)} files")

    def describe(self) -> str:
        if self.valid_source_files is not None or self.val_split is not None:
            return "validation: its own files" if self.path is None else \
                f"validation: split {self.val_split!r}"
        return f"validation: {self.val_fraction:g} of the pairs held out (unless the source " \
               f"has a validation split)"

    def documents(self, whole: bool = False):
        raise TypeError("data=parallel holds pairs: use pairs()")

    def pairs(self, with_test: bool = False, keep_empty: bool = False):
        """The DatasetDict of pairs: train, validation (and test when asked and given), each
        with the columns source and target, pairs with an empty side dropped (keep_empty:
        every pair, as the files have them, for BLEU); and how many were dropped per split."""
        import datasets

        if self.source_files is not None:
            splits = self._text_splits(with_test)
        else:
            splits = self._translation_splits(with_test)
        if "validation" not in splits:
            if len(splits["train"]) < 2:
                raise ConfigError("data", f"{len(splits['train'])} pair(s); at least 2 are "
                                          f"needed to hold one out")
            n_val = max(1, round(self.val_fraction * len(splits["train"])))
            held = splits["train"].train_test_split(test_size=n_val, seed=SPLIT_SEED)
            splits["train"], splits["validation"] = held["train"], held["test"]
        dropped = {}
        for split, ds in list(splits.items()) if not keep_empty else []:
            kept = ds.filter(_both_sides, batched=True, batch_size=10_000)
            dropped[split] = len(ds) - len(kept)
            splits[split] = kept
        return datasets.DatasetDict(splits), dropped

    def _text_splits(self, with_test: bool) -> dict:
        kinds = {"train": "", "validation": "valid_"}
        if with_test:
            kinds["test"] = "test_"
        splits = {}
        for split, kind in kinds.items():
            src, tgt = getattr(self, f"{kind}source_files"), getattr(self, f"{kind}target_files")
            if src is None:
                if split == "test":
                    raise ConfigError("data.test_source_files", "null; allowed: the test "
                                                                "split's source and target files")
                continue
            splits[split] = self._aligned(kind, src, tgt)
        return splits

    def _aligned(self, kind: str, src: Any, tgt: Any):
        """The pairs of line-aligned files (each side's files in sorted order)."""
        import datasets

        from trainrun.data.storage import key

        sides, content = {}, []
        for side, value in (("source", src), ("target", tgt)):
            name = f"data.{kind}{side}_files"
            paths = _paths(name, value)
            require_regular(name, paths, "regular files")
            content.append(require_text(name, paths, self.encoding,
                                        f"text files in {self.encoding} (data.encoding)"))
            sides[side] = [line for p in paths for line in _lines(p, self.encoding)]
        n_src, n_tgt = len(sides["source"]), len(sides["target"])
        if n_src != n_tgt:
            raise ConfigError(f"data.{kind}target_files",
                              f"{n_tgt:,} lines against the {n_src:,} of data.{kind}source_files; "
                              f"allowed: line-aligned files, line i of one the translation of "
                              f"line i of the other")
        ds = datasets.Dataset.from_dict(sides)
        return ds.select_columns(list(SIDES), new_fingerprint=key("pairs", *content))

    def _translation_splits(self, with_test: bool) -> dict:
        """train / validation / test of a data set with a translation column."""
        if self.files is not None:
            available = self._load_files()
            val_split, test_split = self.val_split, self.test_split
        else:
            source = HFDataConfig(path=self.path, name=self.name, train_split=self.train_split,
                                  val_split=self.val_split, text_column=self.translation_column,
                                  batch_size=1, seq_len=1, packing=False,
                                  val_fraction=self.val_fraction)
            content = None
            folder = os.path.expanduser(self.path)
            if os.path.isdir(folder):
                from trainrun.data.sources import _folder_files
                from trainrun.textcheck import fingerprint

                content = fingerprint(_folder_files(folder), folder)
            available = source._load(None, "data.path", content)
            val_split = self.val_split or ("validation" if "validation" in available else None)
            test_split = self.test_split or ("test" if "test" in available else None)
        wanted = {"train": (self.train_split, "data.train_split"),
                  "validation": (val_split, "data.val_split")}
        if with_test:
            if test_split is None:
                raise ConfigError("data.test_split", "null, and the source has no `test` "
                                                     "split; allowed: one of its splits: "
                                                     f"{', '.join(available)}")
            wanted["test"] = (test_split, "data.test_split")
        splits = {}
        for split, (name, key) in wanted.items():
            if name is None:
                continue
            if name not in available:
                raise ConfigError(key, f"{name!r}: no such split; the source has "
                                       f"{', '.join(available)}")
            splits[split] = self._sides(available[name])
        return splits

    def _load_files(self) -> dict:
        import datasets

        paths = _paths("data.files", self.files)
        builder = _BUILDERS[os.path.splitext(paths[0])[1].lower()]
        if builder == "parquet":
            from trainrun.textcheck import fingerprint

            content, options = fingerprint(paths), {}
        else:
            content = require_text("data.files", paths, self.encoding,
                                   f"text files in {self.encoding} (data.encoding)")
            options = {"encoding": self.encoding}
        ds = datasets.load_dataset(builder, data_files=paths, split="train",
                                   cache_dir=_cache_dir(content), **options)
        return {self.train_split: ds}

    def _sides(self, ds):
        """The translation column's src_lang and tgt_lang entries as source and target."""
        column = self.translation_column
        if column not in ds.column_names:
            raise ConfigError("data.translation_column", f"no column {column!r}; the data has "
                                                         f"{', '.join(ds.column_names)}")
        first = ds[0][column] if len(ds) else {}
        if not isinstance(first, dict):
            raise ConfigError("data.translation_column", f"{column!r} holds "
                                                         f"{type(first).__name__}s; allowed: a "
                                                         f"column of {{language: sentence}}")
        for key in ("src_lang", "tgt_lang"):
            lang = getattr(self, key)
            if lang not in first:
                raise ConfigError(f"data.{key}", f"{lang!r} is not a language of the "
                                                 f"{column!r} column, which has "
                                                 f"{', '.join(sorted(first))}; allowed: one of "
                                                 f"them")
        src, tgt = self.src_lang, self.tgt_lang

        def split_sides(batch):
            return {"source": [row[src] or "" for row in batch[column]],
                    "target": [row[tgt] or "" for row in batch[column]]}

        return ds.map(split_sides, batched=True, remove_columns=ds.column_names)


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _paths(key: str, value: Any) -> list[str]:
    """The files of a glob pattern or a list of them (ConfigError when none match)."""
    pattern = TextDataConfig(files=value)
    if not isinstance(value, (str, list, tuple)):
        raise ConfigError(key, f"got {value!r}; allowed: a glob pattern or a list of them")
    paths = pattern.paths()
    if not paths:
        raise ConfigError(key, f"{value!r} matches no file")
    return paths


def _lines(path: str, encoding: str) -> list[str]:
    """A text file's lines, split at \\n alone (as sacrebleu and `wc -l` count them; a \\r
    before it is dropped), the newline at the end of the last one not starting another."""
    with open_regular(path) as f:
        text = f.read().decode(encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _both_sides(batch) -> list[bool]:
    """A pair is kept when neither side is blank (what the token files keep of a document)."""
    return [bool(s and s.strip()) and bool(t and t.strip())
            for s, t in zip(batch["source"], batch["target"], strict=True)]
