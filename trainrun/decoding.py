"""Batched decoding for the models of task "translation" (trainrun/models/seq2seq.py):
greedy and beam search over the model's encode/decode. The encoder runs once per batch; the
decoder reads one position per step over its cache. Sentences that are done leave the batch,
so a step costs what the sentences still decoding need.

A hypothesis's score is the sum of the log-probabilities of the ids it generated, its eos
included: float32 log-softmax over the real vocabulary (the padding ids are never chosen).
max_len bounds the ids a sentence generates, its eos included (so bos and the ids before
eos fit max_len positions); a sentence that reaches it without eos ends there. The model
should be in eval mode (dropout off)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Hypothesis:
    tokens: list[int]  # the generated ids, without bos and eos
    score: float  # the sum of their log-probabilities, eos's included (if it ended so)


def max_length(src_lengths: torch.Tensor, a: float, b: float, limit: int) -> torch.Tensor:
    """fairseq's max_len_a · src_len + max_len_b per sentence (B,), rounded down, between
    1 and limit (the model's max_seq_len: bos and the ids before eos fit its positions)."""
    return (a * src_lengths.double() + b).floor().long().clamp(1, limit)


def per_sentence(max_len: int | torch.Tensor, batch: int) -> list[int]:
    if isinstance(max_len, int):
        return [max_len] * batch
    limits = max_len.tolist()
    if len(limits) != batch:
        raise ValueError(f"max_len has {len(limits)} lengths for {batch} sentences")
    return limits


def next_log_probs(model: torch.nn.Module, last: torch.Tensor, memory, cache) -> torch.Tensor:
    """The log-probabilities (N, vocab_size) of the id after each row's `last` (N, 1)."""
    logits = model.decode(last, memory, cache)[:, -1, :model.vocab_size]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def greedy(model: torch.nn.Module, src: torch.Tensor, src_lengths: torch.Tensor, bos: int,
           eos: int, max_len: int | torch.Tensor) -> list[Hypothesis]:
    """Each sentence's most likely next id, step after step, until eos or max_len ids."""
    B, device = src.shape[0], src.device
    limit = per_sentence(max_len, B)
    memory, cache = model.encode(src, src_lengths), model.new_cache()
    tokens: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    rows = list(range(B))  # the sentence of each row still decoding
    last = torch.full((B, 1), bos, dtype=torch.long, device=device)
    step = 0
    while rows:
        best, ids = next_log_probs(model, last, memory, cache).max(dim=-1)  # (N,)
        step += 1
        keep = []
        for r, (s, token, logp) in enumerate(zip(rows, ids.tolist(), best.tolist(), strict=True)):
            scores[s] += logp
            if token != eos:
                tokens[s].append(token)
                if step < limit[s]:
                    keep.append(r)
        if len(keep) < len(rows):
            order = torch.tensor(keep, dtype=torch.long, device=device)
            memory, ids = memory.select(order), ids[order]
            cache.select(order)
            rows = [rows[r] for r in keep]
        last = ids[:, None]
    return [Hypothesis(tokens[s], scores[s]) for s in range(B)]


def length_penalty_of(length: int, alpha: float) -> float:
    """GNMT's lp(length) = ((5 + length) / 6) ** alpha; alpha 0: 1 (raw log-probabilities)."""
    return ((5 + length) / 6) ** alpha


@dataclass
class Finished:
    """A sentence's finished hypotheses, ranked by score / lp(its length)."""

    beam: int
    alpha: float

    def __post_init__(self):
        self.found: list[tuple[float, Hypothesis]] = []

    def add(self, tokens: list[int], score: float, length: int) -> None:
        self.found.append((score / length_penalty_of(length, self.alpha),
                           Hypothesis(tokens, score)))

    def settled(self, live_score: float, limit: int) -> bool:
        """Whether it holds `beam` hypotheses that no live one can beat: a live score only
        falls (log-probabilities are <= 0), so the best a live hypothesis can reach is its
        score over lp(limit), the largest penalty it may reach."""
        if len(self.found) < self.beam:
            return False
        kept = sorted((n for n, _ in self.found), reverse=True)[self.beam - 1]
        return live_score / length_penalty_of(limit, self.alpha) <= kept

    def best(self) -> Hypothesis:
        return max(self.found, key=lambda found: found[0])[1]  # the first of equals


@torch.no_grad()
def beam_search(model: torch.nn.Module, src: torch.Tensor, src_lengths: torch.Tensor, bos: int,
                eos: int, beam: int, length_penalty: float,
                max_len: int | torch.Tensor) -> list[Hypothesis]:
    """Each sentence's best hypothesis by score / lp(length) (GNMT's, alpha =
    length_penalty; the length counts eos) among those beam search finished.

    The B sentences decode together, `beam` rows each. At each step the 2·beam best
    extensions of a sentence's rows are ranked: an eos among the first `beam` finishes a
    hypothesis, the first `beam` others live on, and the cache follows each to the row it
    grew from. A sentence is done when `beam` finished hypotheses are out of its live ones'
    reach, or at its max_len, where its first `beam` extensions all finish. With beam 1 and
    length_penalty 0 it is greedy()."""
    if beam < 1 or length_penalty < 0:
        raise ValueError(f"beam {beam}, length_penalty {length_penalty}; allowed: beam >= 1, "
                         f"length_penalty >= 0")
    B, device, V = src.shape[0], src.device, model.vocab_size
    limit = per_sentence(max_len, B)
    group = torch.arange(beam, device=device)
    memory = model.encode(src, src_lengths).select(
        torch.arange(B, device=device).repeat_interleave(beam))
    cache = model.new_cache()
    finished = [Finished(beam, length_penalty) for _ in range(B)]
    sentences = list(range(B))  # the sentence of each group of `beam` rows
    scores = torch.full((B, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0  # a sentence's rows start equal: one of them is its hypothesis
    history = torch.empty(B * beam, 0, dtype=torch.long, device=device)
    last = torch.full((B * beam, 1), bos, dtype=torch.long, device=device)
    step = 0
    while sentences:
        N = len(sentences)
        logp = next_log_probs(model, last, memory, cache).view(N, beam, V)
        step += 1
        top, index = (scores[:, :, None] + logp).view(N, beam * V).topk(2 * beam, dim=1)
        origin, token = index // V, index % V  # (N, 2·beam): the row extended, by which id
        # the first `beam` extensions that are not eos (each row has one eos extension: at
        # least `beam` of the 2·beam are others)
        collect(finished, sentences, step, limit, eos, top[:, :beam], origin[:, :beam],
                token[:, :beam], history)
        # the first `beam` extensions that are not eos live on (each row has one eos
        # extension: at least `beam` of the 2·beam are others)
        rank = torch.arange(2 * beam, device=device)
        pick = ((token == eos).long() * 2 * beam + rank).argsort(dim=1)[:, :beam]
        rows = (torch.arange(N, device=device)[:, None] * beam + origin.gather(1, pick)).view(-1)
        history = torch.cat((history[rows], token.gather(1, pick).view(-1, 1)), dim=1)
        scores, last = top.gather(1, pick), token.gather(1, pick).view(-1, 1)
        cache.select(rows)
        best_live = scores.max(dim=1).values.tolist()
        keep = [n for n, s in enumerate(sentences) if step < limit[s]
                and not finished[s].settled(best_live[n], limit[s])]
        if len(keep) < N:
            kept = torch.tensor(keep, dtype=torch.long, device=device)
            order = (kept[:, None] * beam + group).view(-1)
            memory, history, last = memory.select(order), history[order], last[order]
            cache.select(order)
            scores = scores[kept]
            sentences = [sentences[n] for n in keep]
    return [f.best() for f in finished]


def collect(finished: list[Finished], sentences: list[int], step: int, limit: list[int],
            eos: int, top: torch.Tensor, origin: torch.Tensor, token: torch.Tensor,
            history: torch.Tensor) -> None:
    """Add to each sentence the hypotheses this step finishes among its first extensions
    (top, origin, token: (N, beam)): those by eos, and all of them at its max_len.
    history (N·beam, step - 1): each row's ids before this step."""
    beam = top.shape[1]
    for n, (s, scores, origins, tokens) in enumerate(zip(sentences, top.tolist(),
                                                          origin.tolist(), token.tolist(), strict=True)):
        for score, o, t in zip(scores, origins, tokens, strict=True):
            if score == float("-inf") or (t != eos and step < limit[s]):
                continue
            past = history[n * beam + o].tolist()
            finished[s].add(past if t == eos else [*past, t], score, step)
