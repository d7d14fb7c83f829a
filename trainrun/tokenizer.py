"""A run's tokenizer as the commands after training use it: text to ids and back (streamed
one id at a time), the UTF-8 bytes each id stands for (for bits per byte), and the files that
give Hugging Face's `AutoTokenizer` the same ids (`save`).

Today every run is byte-level (trainrun.data: UTF-8 bytes as ids 0..255, end of document
256): `ByteTokenizer`. A tokenizer that a run trains or loads provides the same interface,
its `save` writing its own tokenizer.json.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from trainrun import data

EOT_TEXT = "<|endoftext|>"  # GPT-2's name for the end-of-document token


class Tokenizer(Protocol):
    vocab_size: int  # ids 0..vocab_size-1 (the model's embedding may have padding rows after)
    eot: int  # the end-of-document id

    def encode(self, text: str) -> list[int]:
        """The ids of text, as the data code gives them (without an end-of-document id)."""

    def streamer(self) -> Callable[[int], str]:
        """A function that takes the next id and returns the text it completes ('' while a
        character is still incomplete); the end-of-document id gives ''."""

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes of each id's text; 0 for special ids."""

    def save(self, folder: Path, model_max_length: int) -> list[str]:
        """Write the Hugging Face tokenizer files into folder; return their names."""


def for_run(run_dir: Path) -> Tokenizer:
    """The tokenizer that the run in run_dir trained with: the byte tokenizer (trainrun.data
    has no other yet)."""
    return ByteTokenizer()


class ByteTokenizer:
    """trainrun.data's byte-level ids, in Hugging Face's form: GPT-2's byte-level BPE with
    the 256 bytes as its vocabulary (id = byte value, no merges) and `<|endoftext|>` = 256."""

    vocab_size = data.VOCAB_SIZE
    eot = data.EOT

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))  # data.encode's ids without its end-of-document id

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


def write_config(folder: Path, model_max_length: int) -> list[str]:
    """tokenizer_config.json and special_tokens_map.json of a GPT-2 tokenizer whose
    beginning, end and unknown token are all `<|endoftext|>`, and that adds none of them.
    The text "<|endoftext|>" in a document is its bytes, as in trainrun's data
    (split_special_tokens); the id itself is eos_token_id."""
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
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
