"""A faster encoder of the token files for byte-level BPE tokenizer.json files (GPT-2's kind,
tokenizer=bpe's): the same ids as `tokenizers`, about three times fewer CPU-seconds per MB
(docs/data.md, Token storage).

`tokenizers` spends its time in the byte-level pre-tokenizer and its per-token bookkeeping,
not in the merges. Here an ASCII document is cut into pre-tokens by GPT-2's pattern written
for ASCII text in Python's `re` (the library's pattern, `\\p{L}` and `\\p{N}` being A-Z a-z and
0-9 there, `\\s` the six ASCII spaces in both), and each pre-token's ids come from a dict;
a pre-token not in it is encoded once by the library's own BPE model (`model.tokenize` of
its byte-level characters, what `encode` does to each pre-token). A document with any other
character is encoded by the library whole. The dict is cleared past MAX_WORDS entries.

Only a tokenizer whose pipeline is that is eligible (`WordCache.of`): no normalizer, the
ByteLevel pre-tokenizer with its pattern, a BPE model without dropout, no post-processor
but ByteLevel's (it changes no id), and no added token that is not special (the special
ones are text in a document: JSONTokenizer sets encode_special_tokens). It runs in Python
and holds its lock: several workers need processes (trainrun.data.tokenizing).
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np

MAX_WORDS = 1 << 18  # distinct pre-tokens kept (about 60 MB of Python objects at most)

# tokenizers' ByteLevel pattern on ASCII text:
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+"
                     r"|\s+(?!\S)|\s+", re.ASCII)


def eligible(spec: dict) -> bool:
    """Whether the tokenizer.json (parsed) encodes as WordCache does."""
    pre, post = spec.get("pre_tokenizer"), spec.get("post_processor")
    model = spec.get("model") or {}
    return (spec.get("normalizer") is None
            and isinstance(pre, dict) and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) is True
            and model.get("type") == "BPE" and model.get("dropout") is None
            and (post is None or post.get("type") == "ByteLevel")
            and all(token.get("special") for token in spec.get("added_tokens") or []))


class WordCache:
    """encode_many() of a byte-level BPE `tokenizers.Tokenizer` (eligible()), its special
    tokens' text encoded as text."""

    def __init__(self, tok, prefix_space: bool, byte_chars: dict[int, str]):
        self.tok, self.model, self.prefix_space = tok, tok.model, prefix_space
        # str.translate's table from each ASCII character to its byte-level character
        self.chars = {b: c for b, c in byte_chars.items() if b < 0x80}
        self.words: dict[str, tuple[int, ...]] = {}

    @classmethod
    def of(cls, tok, byte_chars: dict[int, str]) -> WordCache | None:
        """The fast encoder of tok (byte_chars: the byte-level character of each byte,
        tokenizers.bytes_to_unicode), or None where its pipeline is not one it reproduces."""
        spec = json.loads(tok.to_str())
        if not eligible(spec):
            return None
        return cls(tok, bool(spec["pre_tokenizer"].get("add_prefix_space")), byte_chars)

    def word(self, piece: str) -> tuple[int, ...]:
        """The ids of one pre-token, as the library's BPE model gives them; kept."""
        known = self.words.get(piece)
        if known is not None:
            return known
        if len(self.words) >= MAX_WORDS:
            self.words.clear()
        ids = tuple(t.id for t in self.model.tokenize(piece.translate(self.chars)))
        self.words[piece] = ids
        return ids

    def document(self, text: str) -> list:
        """The ids of one document, as a list of sequences of ids."""
        if not text.isascii():
            return [self.tok.encode(text, add_special_tokens=False).ids]
        if self.prefix_space and not text.startswith(" "):
            text = " " + text  # what ByteLevel(add_prefix_space=True) does first
        pieces = PATTERN.findall(text)
        ids = list(map(self.words.get, pieces))
        if None in ids:
            ids = [i if i is not None else self.word(p) for i, p in zip(ids, pieces, strict=True)]
        return ids

    def encode_many(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizer.encode_many: every text's ids one after the other, and their counts."""
        docs = [self.document(text) for text in texts.to_pylist()]
        counts = np.fromiter((sum(map(len, d)) for d in docs), np.int64, len(docs))
        chain = itertools.chain.from_iterable
        return np.fromiter(chain(chain(docs)), np.int64, int(counts.sum())), counts
