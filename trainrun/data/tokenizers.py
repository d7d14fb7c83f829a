"""A run's tokenizer: text to ids (one document, or a batch of them for the token files) and
back (streamed one id at a time), the UTF-8 bytes each id stands for (for bits per byte),
and the files that give Hugging Face's `AutoTokenizer` the same ids (`save`).

`ByteTokenizer` (tokenizer=byte): UTF-8 bytes as ids 0..255, end of document 256.
`JSONTokenizer` (tokenizer=bpe, tokenizer=hf): a Hugging Face tokenizer.json through
`tokenizers`; a run that uses one keeps a copy in its directory (RUN_FILE), which `for_run`
reads back. The text of a special token inside a document is encoded as text, never as the
special id (as in GPT-2's training data): only the data code puts end-of-document ids.
"""

from __future__ import annotations

import codecs
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from trainrun.data.word_cache import WordCache
from trainrun.errors import ConfigError

EOT_TEXT = "<|endoftext|>"  # GPT-2's name for the end-of-document token
RUN_FILE = "tokenizer.json"  # a run's copy of its tokenizer (none: the byte tokenizer)
# end-of-document tokens of common tokenizers, tried in order when tokenizer.eot is null
EOT_NAMES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int  # ids 0..vocab_size-1 (the model's embedding may have padding rows after)
    eot: int  # the end-of-document id

    def encode(self, text: str) -> list[int]:
        """The ids of text, as the data code gives them (without an end-of-document id)."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """encode() of each text, as integer arrays; batches use every core."""

    def encode_many(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """encode() of each text of a pyarrow string array without nulls, on the calling
        thread (the token files' workers call it, trainrun.data.tokenizing): all the ids one
        after the other, as one integer array, and the number of ids of each text."""

    # whether encode_many holds Python's lock while it works: the token files' workers are
    # then processes rather than threads (trainrun.data.tokenizing)
    holds_gil: bool

    def fingerprint(self) -> str:
        """Changes whenever the ids of some text would."""

    def streamer(self) -> Callable[[int], str]:
        """A function that takes the next id and returns the text it completes ('' while a
        character is still incomplete); the end-of-document id gives ''."""

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes of each id's text; 0 for special ids."""

    def save(self, folder: Path, model_max_length: int) -> list[str]:
        """Write the Hugging Face tokenizer files into folder; return their names."""


def for_run(run_dir: Path, eot: str | None = None) -> Tokenizer:
    """The tokenizer that the run in run_dir trained with: its tokenizer.json (end of
    document: the token named `eot`, as tokenizer.eot), or the byte tokenizer."""
    path = Path(run_dir) / RUN_FILE
    return JSONTokenizer.from_file(path, eot) if path.is_file() else ByteTokenizer()


class ByteTokenizer:
    """trainrun.data's byte-level ids, in Hugging Face's form: GPT-2's byte-level BPE with
    the 256 bytes as its vocabulary (id = byte value, no merges) and `<|endoftext|>` = 256."""

    vocab_size = 257
    eot = 256
    holds_gil = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def encode_many(self, texts) -> tuple[np.ndarray, np.ndarray]:
        from trainrun.data.tokenizing import utf8

        data, offsets = utf8(texts)  # the ids are the bytes: Arrow holds them already
        return data[offsets[0]:offsets[-1]], np.diff(offsets)

    def fingerprint(self) -> str:
        return "byte"

    def streamer(self) -> Callable[[int], str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: decoder.decode(bytes([i])) if 0 <= i < 256 else ""

    def token_bytes(self) -> np.ndarray:
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        sizes[:256] = 1
        return sizes

    def hf(self):
        """The `tokenizers.Tokenizer` with the same ids."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, processors

        chars = bytes_to_unicode()
        tok = HFTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([EOT_TEXT])  # the next id: 256
        assert tok.token_to_id(EOT_TEXT) == self.eot
        return tok

    def save(self, folder: Path, model_max_length: int) -> list[str]:
        tok = self.hf()
        tok.save(str(folder / "tokenizer.json"))
        written = tok.model.save(str(folder))  # vocab.json, merges.txt: GPT2Tokenizer's files
        return ["tokenizer.json", *(Path(p).name for p in written),
                *write_config(folder, model_max_length)]


def write_config(folder: Path, model_max_length: int, eot_text: str = EOT_TEXT,
                 tokenizer_class: str = "GPT2Tokenizer") -> list[str]:
    """tokenizer_config.json and special_tokens_map.json of a tokenizer whose beginning, end
    and unknown token are all the end-of-document token, and that adds none of them.
    That token's text in a document is text, as in trainrun's data (split_special_tokens);
    the id itself is eos_token_id."""
    special = {"bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text}
    config = {"tokenizer_class": tokenizer_class, "add_prefix_space": False,
              "add_bos_token": False, "split_special_tokens": True,
              "model_max_length": model_max_length, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer_config.json", "special_tokens_map.json"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable character for each byte value, which byte-level tokenizers use as
    the text of the byte's token: printable Latin-1 bytes stand for themselves, the others
    for the characters from U+0100 on, in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class JSONTokenizer:
    """A Hugging Face tokenizer.json (`tokenizers`), its end of document the token `eot`
    names, or the first of EOT_NAMES that it has."""

    def __init__(self, tok, eot: str | None, source: str):
        tok.encode_special_tokens = True  # a special token's text in a document is text
        tok.no_padding()
        tok.no_truncation()
        self.tok, self.source = tok, source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_text = eot if eot is not None else next(
            (name for name in EOT_NAMES if tok.token_to_id(name) is not None), None)
        if self.eot_text is None or tok.token_to_id(self.eot_text) is None:
            named = f"has no token {eot!r}" if eot is not None else \
                f"has none of {', '.join(EOT_NAMES)}"
            raise ConfigError("tokenizer.eot", f"{source} {named}; allowed: the name of one of "
                                               f"its special tokens")
        self.eot = tok.token_to_id(self.eot_text)
        self.words = WordCache.of(tok, bytes_to_unicode())  # byte-level BPE: fewer CPU-s
        self.holds_gil = self.words is not None

    @classmethod
    def from_file(cls, path: Path, eot: str | None) -> JSONTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)), eot, str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise ConfigError("tokenizer.path", f"{path}: not a tokenizer.json that "
                              f"`tokenizers` reads ({str(exc).splitlines()[0]})") from None

    def to_str(self) -> str:
        return self.tok.to_str()

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(f"{self.to_str()}\0{self.eot}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_many(self, texts) -> tuple[np.ndarray, np.ndarray]:
        if self.words is not None:
            return self.words.encode_many(texts)
        # encode_batch_fast (tokenizers >= 0.21): the same ids, without the character offsets
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        ids = [e.ids for e in encode(texts.to_pylist(), add_special_tokens=False)]
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(counts.sum())), counts

    def unknown_id(self) -> int | None:
        """The id of the unknown token its model maps unseen text to, if it has one."""
        token = getattr(self.tok.model, "unk_token", None)
        if token is None and getattr(self.tok.model, "unk_id", None) is not None:
            return self.tok.model.unk_id  # Unigram
        return None if token is None else self.tok.token_to_id(token)

    def streamer(self) -> Callable[[int], str]:
        ids: list[int] = []
        shown = ""

        def step(i: int) -> str:
            nonlocal shown
            if i == self.eot or not 0 <= i < self.vocab_size:
                return ""
            ids.append(i)
            text = self.tok.decode(ids, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # a character still incomplete
                return ""
            new, shown = text[len(shown):], text
            return new

        return step

    def token_bytes(self) -> np.ndarray:
        """Byte-level tokens: the bytes their characters stand for; others: the UTF-8 of
        the id decoded alone. Special tokens: 0."""
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        unbyte = {c: b for b, c in bytes_to_unicode().items()}
        byte_level = type(self.tok.decoder).__name__ == "ByteLevel"
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or piece in special:
                continue
            if byte_level and all(c in unbyte for c in piece):
                sizes[i] = len(piece)
            else:
                sizes[i] = len(self.tok.decode([i]).encode("utf-8"))
        return sizes

    def save(self, folder: Path, model_max_length: int) -> list[str]:
        (folder / RUN_FILE).write_text(self.to_str(), encoding="utf-8")
        return [RUN_FILE, *write_config(folder, model_max_length, self.eot_text,
                                        "PreTrainedTokenizerFast")]
