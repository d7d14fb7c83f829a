"""The tokenizer group (tokenizer=byte|bpe|hf): one schema per option, each building the
run's Tokenizer from its section and the run's documents.

byte: UTF-8 bytes, nothing to build. bpe: a byte-level BPE trained with `tokenizers` on the
training split, once per (documents, settings): the trained tokenizer.json is cached like
the tokens (storage.py). hf: a tokenizer.json given by file, folder or hub name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from trainrun.data import storage
from trainrun.data.tokenizers import EOT_TEXT, ByteTokenizer, JSONTokenizer, Tokenizer
from trainrun.errors import ConfigError, require_positive
from trainrun.registry import options_of, register

MAX_VOCAB = 1 << 32  # token files hold uint32 ids at most


@dataclass
class TokenizerConfig:
    def validate(self, prefix: str) -> None:
        pass

    def build(self, docs, log: Callable[[str], None]) -> Tokenizer:
        """The tokenizer for these documents (a DatasetDict with train and validation)."""
        raise NotImplementedError


@register("tokenizer", "byte")
@dataclass
class ByteConfig(TokenizerConfig):
    def build(self, docs, log: Callable[[str], None]) -> Tokenizer:
        return ByteTokenizer()


@register("tokenizer", "bpe")
@dataclass
class BPEConfig(TokenizerConfig):
    vocab_size: int = MISSING  # ids in all: the 256 bytes, merges, special tokens
    min_frequency: int = MISSING  # a pair merges only when it occurs this often
    special_tokens: list[str] = field(default_factory=lambda: [EOT_TEXT])
    eot: str = MISSING  # the special token that ends every document

    def validate(self, prefix: str) -> None:
        require_positive(f"{prefix}.min_frequency", self.min_frequency)
        least = 256 + len(set(self.special_tokens))
        if not least <= self.vocab_size < MAX_VOCAB:
            raise ConfigError(f"{prefix}.vocab_size", f"got {self.vocab_size}; allowed: "
                              f"{least} (the 256 bytes and the special tokens) to {MAX_VOCAB - 1}")
        if self.eot not in self.special_tokens:
            raise ConfigError(f"{prefix}.eot", f"{self.eot!r} is not among "
                              f"{prefix}.special_tokens {list(self.special_tokens)}; allowed: one "
                              f"of them")

    def build(self, docs, log: Callable[[str], None]) -> Tokenizer:
        settings = (self.vocab_size, self.min_frequency, list(self.special_tokens))
        folder = storage.cache_root() / "tokenizers" / storage.key(
            docs["train"]._fingerprint, *settings)
        storage.cached(folder, lambda tmp: self.train(docs["train"], tmp, log))
        return JSONTokenizer.from_file(folder / "tokenizer.json", self.eot)

    def train(self, train, folder: Path, log: Callable[[str], None]) -> None:
        import time

        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size, min_frequency=self.min_frequency,
            special_tokens=list(self.special_tokens), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        log(f"training a BPE tokenizer (vocab_size {self.vocab_size}) on "
            f"{len(train):,} training documents")
        began = time.monotonic()
        texts = (batch["text"] for batch in train.iter(batch_size=storage.BATCH))
        tok.train_from_iterator(texts, trainer=trainer, length=len(train))
        tok.save(str(folder / "tokenizer.json"))
        log(f"trained the BPE tokenizer: {tok.get_vocab_size():,} ids in "
            f"{time.monotonic() - began:.1f}s")


@register("tokenizer", "hf")
@dataclass
class HFConfig(TokenizerConfig):
    path: str = MISSING  # a tokenizer.json, a folder holding one, or a hub name
    eot: str | None = None  # the end-of-document token; null: the tokenizer's end of text

    def local(self) -> bool:
        """A path rather than a hub name (`gpt2`, `org/name`)."""
        p = self.path
        return os.path.exists(os.path.expanduser(p)) or p.endswith(".json") or \
            p.startswith(("/", ".", "~"))

    def validate(self, prefix: str) -> None:
        if not self.path.strip():
            raise ConfigError(f"{prefix}.path", "empty; allowed: a tokenizer.json, a folder "
                                                "holding one, or a hub name")
        path = Path(self.path).expanduser()
        if self.local() and not path.exists():
            raise ConfigError(f"{prefix}.path", f"{self.path}: no such file or folder; allowed: "
                                                f"a tokenizer.json, a folder holding one, or a "
                                                f"hub name")
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{prefix}.path", f"{self.path}: a folder without tokenizer.json; "
                                                f"allowed: a folder holding one, or the file")

    def build(self, docs, log: Callable[[str], None]) -> Tokenizer:
        path = Path(self.path).expanduser()
        if self.local():
            return JSONTokenizer.from_file(path / "tokenizer.json" if path.is_dir() else path,
                                           self.eot)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            RepositoryNotFoundError,
        )

        from trainrun.data.hub import endpoint, offline_unless_reachable

        try:
            with offline_unless_reachable(self.path, "tokenizer.path", ("HF_HUB_OFFLINE",)):
                file = hf_hub_download(self.path, "tokenizer.json")
        except (OSError, EntryNotFoundError, HFValidationError) as exc:  # the hub answered no
            if isinstance(exc, RepositoryNotFoundError):
                why = f"no such repository on {endpoint()} (or it is private or gated)"
            elif isinstance(exc, EntryNotFoundError):
                why = "the repository has no tokenizer.json"
            else:
                why = str(exc).splitlines()[0].rstrip(".") or type(exc).__name__
            raise ConfigError("tokenizer.path", f"{self.path!r}: {why}; allowed: a "
                                                f"tokenizer.json, a folder holding one, or a "
                                                f"hub name with one") from None
        return JSONTokenizer.from_file(Path(file), self.eot)


TOKENIZERS: dict[str, type[TokenizerConfig]] = options_of("tokenizer")  # each class registers itself
