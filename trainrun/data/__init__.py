"""The data of a run, as the rest of trainrun sees it: the source and tokenizer options
(DATA, TOKENIZERS), `load` (documents -> tokenizer -> cached token files -> Sequences),
`load_whole` (every document, as Windows that score each token) and the run's tokenizer.

    sources.py           data=builtin|text|hf: the documents, split into train and validation
    tokenizer_options.py tokenizer=byte|bpe|hf: builds the run's tokenizer
    tokenizers.py        the Tokenizer interface, byte-level and tokenizer.json ones
    storage.py           the token cache: flat memory-mapped token files per split
    sequences.py         fixed-length sequences over a split's tokens (packing or not), and
                         the windows that make every token a target
    order.py             the seeded order of the training sequences (docs/design.md, Data)
    hub.py               a quick look whether the Hugging Face hub can be reached
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainrun import signals
from trainrun.data import storage
from trainrun.data.sequences import IGNORE, Sequences, Windows
from trainrun.data.sources import DATA, DataConfig
from trainrun.data.tokenizer_options import TOKENIZERS, TokenizerConfig
from trainrun.data.tokenizers import RUN_FILE, Tokenizer, for_run
from trainrun.errors import ConfigError

__all__ = ["DATA", "IGNORE", "RUN_FILE", "TOKENIZERS", "DataConfig", "Loaded", "Sequences",
           "Tokenizer", "TokenizerConfig", "Windows", "check_batch", "for_run", "load",
           "load_whole"]


@dataclass
class Loaded:
    train: Sequences
    validation: Sequences
    tokenizer: Tokenizer

    def __getitem__(self, split: str) -> Sequences:
        return getattr(self, split)


def load(cfg: DataConfig, tokenizer_cfg: TokenizerConfig | None = None,
         log: Callable[[str], None] = lambda line: None,
         tokenizer: Tokenizer | None = None) -> Loaded:
    """The splits as Sequences over the cached token files, and the tokenizer (`tokenizer`,
    e.g. a finished run's copy, else the one tokenizer_cfg builds)."""
    _quiet_datasets()
    docs = cfg.splits()
    log(f"data: {len(docs['train']):,} train / {len(docs['validation']):,} validation "
        f"documents; {cfg.describe()}")
    signals.check()  # a start-up stop that came while `datasets` loaded them
    tokenizer = tokenizer or (tokenizer_cfg or TOKENIZERS["byte"]()).build(docs, log)
    signals.check()
    folder = storage.tokenize(docs, tokenizer, log)
    out = {}
    for split in storage.SPLITS:
        seqs = _sequences(cfg, folder, split, docs, tokenizer)
        if len(seqs) == 0:
            raise ConfigError(
                "data", f"the {split} split has no sequence of data.seq_len={cfg.seq_len} tokens"
            )
        out[split] = seqs
    log(f"tokens: {len(out['train'].tokens):,} train / {len(out['validation'].tokens):,} "
        f"validation, vocabulary {tokenizer.vocab_size:,} ids; cache {folder}")
    return Loaded(out["train"], out["validation"], tokenizer)


def load_whole(cfg: DataConfig, tokenizer: Tokenizer,
               log: Callable[[str], None] = lambda line: None) -> Windows:
    """Every document of the source, none held out (DataConfig.documents(whole=True)), as
    Windows that make each of its tokens a target: data scored whole (trainrun-eval)."""
    _quiet_datasets()
    docs = cfg.splits(whole=True)
    folder = storage.tokenize(docs, tokenizer, log)
    windows = Windows(_sequences(cfg, folder, "all", docs, tokenizer))
    if windows.num_targets(np.arange(len(windows))) == 0:
        raise ConfigError("data", f"{len(docs['all']):,} document(s) with no token to score; "
                                  f"allowed: data with some text")
    return windows


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()  # they write carriage returns; the run logs its own lines
    datasets.logging.set_verbosity_error()


def _sequences(cfg: DataConfig, folder, split: str, docs, tokenizer: Tokenizer) -> Sequences:
    tokens, offsets = storage.open_split(folder, split, tokenizer.vocab_size)
    record = {"documents": docs[split]._fingerprint,
              "tokens": storage.info(folder)["splits"][split]["sha256"],
              "count": len(tokens)}
    return Sequences(tokens, offsets, cfg.seq_len, cfg.packing, tokenizer.eot, record)


def check_batch(cfg: DataConfig, train: Sequences) -> None:
    """A micro-batch holds no more sequences than the training split has."""
    if cfg.batch_size > len(train):
        raise ConfigError("data.batch_size", f"{cfg.batch_size} exceeds the {len(train)} "
                          f"training sequences of data.seq_len={cfg.seq_len} tokens; allowed: "
                          f"at most {len(train)}")
