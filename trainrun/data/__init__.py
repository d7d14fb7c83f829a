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
    mixture.py           data=mix: several sources drawn by weight, each counting its epochs
    parallel.py          data=parallel: sentence pairs for translation, a split per side
    pairs.py             pairs as tensors, and the training pairs in length buckets
    hub.py               a quick look whether the Hugging Face hub can be reached
    stream.py            data.streaming=true: tokenized on the fly, its position checkpointed
    stream_reader.py     a stream's rows from any position: read, tokenized, packed, shuffled
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainrun import signals
from trainrun.data import storage, stream, tokenizing
from trainrun.data.mixture import MixDataConfig, Mixture
from trainrun.data.pairs import Buckets, Pairs, Side
from trainrun.data.parallel import SIDES, ParallelDataConfig
from trainrun.data.sequences import IGNORE, Sequences, Windows
from trainrun.data.sources import DATA, DataConfig
from trainrun.data.stream import Stream
from trainrun.data.tokenizer_options import TOKENIZERS, TokenizerConfig
from trainrun.data.tokenizers import RUN_FILE, Tokenizer, for_run
from trainrun.errors import ConfigError

__all__ = ["DATA", "IGNORE", "RUN_FILE", "TOKENIZERS", "Buckets", "DataConfig", "Loaded",
           "MixDataConfig", "Mixture", "Pairs", "ParallelDataConfig", "Sequences", "Stream",
           "Tokenizer", "TokenizerConfig", "Windows", "check_batch", "for_run", "load",
           "load_pairs", "load_whole"]


@dataclass
class Loaded:
    train: Sequences | Buckets | Mixture | Stream
    validation: Sequences | Pairs | Mixture
    tokenizer: Tokenizer
    test: Pairs | None = None  # data=parallel's test split, when asked for

    def __getitem__(self, split: str) -> Sequences:
        return getattr(self, split)


def load(cfg: DataConfig, tokenizer_cfg: TokenizerConfig | None = None,
         log: Callable[[str], None] = lambda line: None,
         tokenizer: Tokenizer | None = None, train: bool = True,
         bar: storage.Bar | None = None) -> Loaded:
    """The splits as Sequences over the cached token files, and the tokenizer (`tokenizer`,
    e.g. a finished run's copy, else the one tokenizer_cfg builds); `bar`: the progress bar
    of the tokenization on a terminal (storage.Bar). With data.streaming, train is a Stream
    and validation the stream's first slice (stream.py); train=False: the stream's training
    rows are not looked at (validation alone is wanted). data=mix's splits are Mixtures of
    its sources' (load_mix)."""
    if isinstance(cfg, MixDataConfig):
        return load_mix(cfg, tokenizer_cfg, log, tokenizer, bar)
    _quiet_datasets()
    if getattr(cfg, "streaming", False):
        return Loaded(*stream.load(cfg, tokenizer_cfg or TOKENIZERS["byte"](), log, tokenizer,
                                   check_train=train))
    docs = cfg.splits()
    log(f"data: {len(docs['train']):,} train / {len(docs['validation']):,} validation "
        f"documents; {cfg.describe()}")
    signals.check()  # a start-up stop that came while `datasets` loaded them
    tokenizer = tokenizer or (tokenizer_cfg or TOKENIZERS["byte"]()).build(docs, log)
    signals.check()
    folder = storage.tokenize(docs, tokenizer, log, workers(cfg), bar)
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


def load_mix(cfg: MixDataConfig, tokenizer_cfg: TokenizerConfig | None = None,
             log: Callable[[str], None] = lambda line: None,
             tokenizer: Tokenizer | None = None, bar: storage.Bar | None = None) -> Loaded:
    """A mixture's splits, each a Mixture of its sources' Sequences; one tokenizer for all
    (tokenizer=bpe is trained on every source's training documents together)."""
    import datasets

    _quiet_datasets()
    parts, weights = dict(sorted(cfg.parts().items())), cfg.weights()  # by name: the stream
    # and the record do not depend on the order the sources were written in
    docs = {}
    for name, part in parts.items():
        docs[name] = part.splits()
        log(f"data {name}: {len(docs[name]['train']):,} train / "
            f"{len(docs[name]['validation']):,} validation documents; {part.describe()}")
        signals.check()
    if tokenizer is None:
        text = datasets.Features({"text": datasets.Value("string")})  # large_string too
        every = datasets.concatenate_datasets([d["train"].cast(text) for d in docs.values()])
        tokenizer = (tokenizer_cfg or TOKENIZERS["byte"]()).build({"train": every}, log)
    signals.check()
    out = {split: {} for split in storage.SPLITS}
    for name, part in parts.items():
        folder = storage.tokenize(docs[name], tokenizer, log, workers(cfg), bar)
        for split in storage.SPLITS:
            seqs = _sequences(part, folder, split, docs[name], tokenizer)
            if len(seqs) == 0:
                raise ConfigError(f"data.sources.{name}", f"the {split} split has no sequence "
                                                          f"of data.seq_len={cfg.seq_len} tokens")
            out[split][name] = seqs
        log(f"tokens {name}: {len(out['train'][name].tokens):,} train / "
            f"{len(out['validation'][name].tokens):,} validation; cache {folder}")
    log(f"data: {cfg.describe()}; vocabulary {tokenizer.vocab_size:,} ids")
    return Loaded(Mixture(out["train"], weights), Mixture(out["validation"]), tokenizer)


def load_pairs(cfg: ParallelDataConfig, tokenizer_cfg: TokenizerConfig | None = None,
               log: Callable[[str], None] = lambda line: None,
               tokenizer: Tokenizer | None = None, seed: int = 0,
               with_test: bool = False, bar: storage.Bar | None = None) -> Loaded:
    """Sentence pairs: train as Buckets, validation (and test, with_test) as Pairs.
    One tokenizer for both sides (tokenizer=bpe is trained on the source and target sentences
    of the training split together), so that the model can share one embedding."""
    import datasets

    _quiet_datasets()
    pairs, dropped = cfg.pairs(with_test)
    log(f"data: {len(pairs['train']):,} train / {len(pairs['validation']):,} validation pairs; "
        f"{cfg.describe()}" + _dropped(dropped, "with an empty side"))
    signals.check()
    if tokenizer is None:
        both = datasets.concatenate_datasets([_side(pairs["train"], s) for s in SIDES])
        tokenizer = (tokenizer_cfg or TOKENIZERS["byte"]()).build({"train": both}, log)
    check_coverage(tokenizer, pairs["train"])
    signals.check()
    folders = {s: storage.tokenize(datasets.DatasetDict(
        {split: _side(ds, s) for split, ds in pairs.items()}), tokenizer, log, workers(cfg), bar)
        for s in SIDES}
    out, long = {}, {}
    for split in pairs:
        sides = [Side(*storage.open_split(folders[s], split, tokenizer.vocab_size))
                 for s in SIDES]
        record = {"documents": pairs[split]._fingerprint, "tokens": hashlib.sha256(json.dumps(
            [storage.info(folders[s])["splits"][split]["sha256"] for s in SIDES]).encode()
        ).hexdigest(), "count": len(sides[0].lengths)}
        out[split] = Pairs(*sides, cfg.limits(), tokenizer.eot, pairs[split], record)
        long[split] = out[split].dropped
        if len(out[split]) == 0:
            raise ConfigError("data", f"the {split} split has no pair within data.max_source_len"
                                      f"={cfg.limits()[0]} and max_target_len={cfg.limits()[1]} "
                                      f"tokens")
    train = Buckets(out["train"], cfg.max_tokens, cfg.batch_size, seed)
    log(f"pairs: {len(out['train']):,} train in {len(train):,} batches of "
        f"{f'up to {cfg.max_tokens:,} tokens' if cfg.max_tokens else f'{cfg.batch_size} pairs'}"
        f", {len(out['validation']):,} validation; vocabulary {tokenizer.vocab_size:,} ids, "
        f"shared by both sides" + _dropped(long, f"over data.max_source_len={cfg.limits()[0]} "
                                                 f"or max_target_len={cfg.limits()[1]} tokens"))
    return Loaded(train, out["validation"], tokenizer, out.get("test"))


COVERAGE_PAIRS, MAX_UNKNOWN = 1000, 0.05


def check_coverage(tokenizer: Tokenizer, train) -> None:
    """A tokenizer with an unknown token must know both languages: one made for one side
    alone (a target-language WordPiece, say) maps the other's words to it, and the model
    could not read or write them. Checked on the first COVERAGE_PAIRS training pairs."""
    unknown = tokenizer.unknown_id() if hasattr(tokenizer, "unknown_id") else None
    if unknown is None:
        return  # bytes, or a byte-level BPE: every text has its ids
    head = train.select(range(min(COVERAGE_PAIRS, len(train))))
    rates = {}
    for side in SIDES:
        ids = tokenizer.encode_batch(head[side])
        total = sum(len(a) for a in ids)
        rates[side] = sum(int((a == unknown).sum()) for a in ids) / max(total, 1)
    side = max(rates, key=rates.get)
    if rates[side] > MAX_UNKNOWN:
        other = "target" if side == "source" else "source"
        raise ConfigError("tokenizer", f"{tokenizer.source} maps {rates[side]:.0%} of the "
                                       f"{side} tokens to its unknown token (the {other}'s: "
                                       f"{rates[other]:.0%}), a tokenizer of one side alone; "
                                       f"allowed: one vocabulary for both languages, as "
                                       f"tokenizer=bpe trains on the two sides together")


def _side(ds, side: str):
    """One side of the pairs as documents (a `text` column), for the tokenizer and the token
    files."""
    return ds.select_columns([side]).rename_column(side, "text")


def _dropped(counts: dict[str, int], why: str) -> str:
    if not any(counts.values()):
        return ""
    return "; dropped " + ", ".join(f"{n:,} {split}" for split, n in counts.items() if n) + \
        f" pair(s) {why}"


def load_whole(cfg: DataConfig, tokenizer: Tokenizer,
               log: Callable[[str], None] = lambda line: None) -> Windows:
    """Every document of the source, none held out (DataConfig.documents(whole=True)), as
    Windows that make each of its tokens a target: data scored whole (trainrun-eval)."""
    if isinstance(cfg, MixDataConfig):
        raise ConfigError("data", "a mixture has no whole to score (its sources are drawn by "
                                  "weight); allowed: --split validation or --split train, "
                                  "every source's split as one set")
    _quiet_datasets()
    docs = cfg.splits(whole=True)
    folder = storage.tokenize(docs, tokenizer, log, workers(cfg))
    windows = Windows(_sequences(cfg, folder, "all", docs, tokenizer))
    if windows.num_targets(np.arange(len(windows))) == 0:
        raise ConfigError("data", f"{len(docs['all']):,} document(s) with no token to score; "
                                  f"allowed: data with some text")
    return windows


def workers(cfg: DataConfig) -> int:
    """The threads that tokenize (data.tokenize_workers)."""
    return tokenizing.workers(cfg.tokenize_workers)


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


def check_batch(cfg: DataConfig, train: Sequences | Mixture | Stream) -> None:
    """A micro-batch holds no more sequences than the training split has (a mixture's
    sources repeat, each by itself, and a stream has no end: any batch size is drawn)."""
    if isinstance(train, (Mixture, Stream)):
        return
    if cfg.batch_size > len(train):
        raise ConfigError("data.batch_size", f"{cfg.batch_size} exceeds the {len(train)} "
                          f"training sequences of data.seq_len={cfg.seq_len} tokens; allowed: "
                          f"at most {len(train)}")
