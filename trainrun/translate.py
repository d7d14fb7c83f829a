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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainrun import bleu, decoding
from trainrun.data import Pairs, Tokenizer


@dataclass(frozen=True)
class Search:
    """How to decode: beam 1 is greedy; length_penalty is GNMT's alpha (0: raw log-prob)."""

    beam: int = 1
    length_penalty: float = 0.6
    max_len_a: float = 1.2
    max_len_b: int = 10
    sentences: int = 32  # per batch (times the beam: the decoder's rows)


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
    return bleu.score(hypotheses, [r.strip() for r in pairs.references(indices)]), hypotheses
