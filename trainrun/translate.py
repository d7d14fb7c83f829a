"""Translating many sentences with an encoder-decoder (trainrun.decoding does one batch):
sentences sorted by length into batches, decoded greedily or with beam search, put back in
their order and made text again. trainrun-translate, trainrun-eval's BLEU and the BLEU of
trainer.bleu_every all translate through here, so that they decode alike.

The source reads as in training: the sentence's ids and the end-of-sentence id; a longer
one than the model's positions is cut (the caller is told how many were). The decoder starts
from the end-of-sentence id and stops at it, or after max_len_a x source length + max_len_b
tokens (fairseq's rule), never past the model's positions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainrun import bleu, decoding
from trainrun.data import Pairs, Tokenizer
from trainrun.errors import ConfigError


@dataclass(frozen=True)
class Search:
    """How to decode: beam 1 is greedy; length_penalty is GNMT's alpha (0: raw log-prob)."""

    beam: int = 1
    length_penalty: float = 0.6  # Vaswani et al.'s (with beam 4)
    max_len_a: float = 1.0  # at most a x source length + b tokens: the paper's input + 50
    max_len_b: int = 50
    sentences: int = 32  # per batch (times the beam: the decoder's rows)


def search_arguments(p, beam: int) -> None:
    """--beam, --length-penalty, --max-len-a, --max-len-b, --batch-sentences (argparse)."""
    p.add_argument("--beam", type=int, default=beam, metavar="K",
                   help=f"beam size; 1: greedy (default {beam})")
    p.add_argument("--length-penalty", type=float, default=Search.length_penalty, metavar="A",
                   help="GNMT's alpha: a hypothesis ranks by log p / ((5 + length) / 6)^A; 0: "
                        f"by log p (default {Search.length_penalty})")
    p.add_argument("--max-len-a", type=float, default=Search.max_len_a, metavar="A",
                   help=f"a translation has at most A x source length + B tokens (default "
                        f"{Search.max_len_a:g})")
    p.add_argument("--max-len-b", type=int, default=Search.max_len_b, metavar="B",
                   help=f"(default {Search.max_len_b})")
    p.add_argument("--batch-sentences", type=int, default=Search.sentences, metavar="N",
                   help=f"sentences decoded together (default {Search.sentences})")


def search_of(args) -> Search:
    """The Search of the arguments search_arguments adds (ConfigError naming a bad one)."""
    for name, ok, allowed in (
            ("--beam", args.beam >= 1, "an integer >= 1 (1: greedy)"),
            ("--length-penalty", math.isfinite(args.length_penalty), "a number (0: none)"),
            ("--max-len-a", math.isfinite(args.max_len_a) and args.max_len_a >= 0,
             "a number >= 0"),
            ("--max-len-b", args.max_len_b >= 0, "an integer >= 0"),
            ("--batch-sentences", args.batch_sentences >= 1, "an integer >= 1")):
        if not ok:
            value = getattr(args, name[2:].replace("-", "_"))
            raise ConfigError(name, f"got {value}; allowed: {allowed}")
    if args.max_len_a == 0 and args.max_len_b == 0:
        raise ConfigError("--max-len-b", "0 with --max-len-a 0: no token to translate with; "
                                         "allowed: a length of 1 or more")
    return Search(args.beam, args.length_penalty, args.max_len_a, args.max_len_b,
                  args.batch_sentences)


@dataclass
class Translated:
    ids: list[list[int]]  # per sentence, in the input's order, without the end of sentence
    scores: list[float]  # each hypothesis's sum of log-probabilities
    cut: int  # sources cut to the model's positions
    tokens: int  # generated tokens, the end of sentence included


@torch.no_grad()
def translate_ids(model: torch.nn.Module, sources: list[list[int]], eot: int, search: Search,
                  autocast: Callable | None = None) -> Translated:
    """Translate token-id sentences (without the end of sentence)."""
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    cut = sum(len(s) + 1 > limit for s in sources)
    rows = [list(s[:limit - 1]) + [eot] for s in sources]
    order = np.argsort([len(r) for r in rows], kind="stable")
    ids: list[list[int] | None] = [None] * len(rows)
    scores = [0.0] * len(rows)
    tokens = 0
    for start in range(0, len(order), search.sentences):
        chosen = order[start:start + search.sentences]
        lengths = torch.tensor([len(rows[i]) for i in chosen])
        src = torch.full((len(chosen), int(lengths.max())), eot, dtype=torch.int64)
        for row, i in enumerate(chosen):
            src[row, :len(rows[i])] = torch.tensor(rows[i])
        src, lengths = src.to(device), lengths.to(device)
        max_len = decoding.max_length(lengths, search.max_len_a, search.max_len_b, limit)
        with (autocast or contextlib.nullcontext)():
            if search.beam == 1:
                found = decoding.greedy(model, src, lengths, eot, eot, max_len)
            else:
                found = decoding.beam_search(model, src, lengths, eot, eot, search.beam,
                                             search.length_penalty, max_len)
        for i, hyp in zip(chosen, found, strict=True):
            ids[i], scores[i] = list(hyp.tokens), float(hyp.score)
            tokens += len(hyp.tokens) + 1
    return Translated(ids, scores, cut, tokens)


def text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The ids as text, one line: the decoder's newlines (there should be none) as spaces."""
    step = tokenizer.streamer()
    return "".join(step(i) for i in ids).replace("\n", " ").strip()


def translate_lines(model: torch.nn.Module, tokenizer: Tokenizer, lines: list[str],
                    search: Search, autocast: Callable | None = None) -> tuple[list[str], Translated]:
    """Translate lines of text; an empty line gives an empty line."""
    sources = [np.asarray(a).tolist() for a in tokenizer.encode_batch(lines)] if lines else []
    done = translate_ids(model, sources, tokenizer.eot, search, autocast)
    return [text(tokenizer, ids) if line.strip() else ""
            for line, ids in zip(lines, done.ids, strict=True)], done


def scores_of(model: torch.nn.Module, tokenizer: Tokenizer, pairs: Pairs, n: int,
              search: Search, autocast: Callable | None = None) -> tuple[bleu.Scores, list[str]]:
    """BLEU and chrF of the first n pairs' translations against their targets (as the files
    have them), and the translations."""
    indices = np.arange(min(n, len(pairs)))
    done = translate_ids(model, pairs.sources(indices), tokenizer.eot, search, autocast)
    hypotheses = [text(tokenizer, ids) for ids in done.ids]
    return bleu.score(hypotheses, [r.rstrip() for r in pairs.references(indices)]), hypotheses
