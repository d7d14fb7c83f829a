"""Text from a model, one token at a time, which `trainrun-sample` streams
(trainrun.commands.sample).

Each sample ends at max_new_tokens or at the end of a document. Sampling: temperature 0
is greedy; otherwise the logits are divided by the temperature, cut to the top_k most likely
ids (0: all) and then to the smallest set whose probability reaches top_p, and an id is
drawn from a seeded generator (the same seed gives the same text on the same device). The model reads the context once, then each
new token is one forward pass of one position over a KV cache.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch


@torch.no_grad()
def generate(model: torch.nn.Module, ids: list[int], max_new_tokens: int,
             pick: Callable[[torch.Tensor], int], autocast=None) -> Iterator[int]:
    """Yield max_new_tokens ids that follow `ids`. When the cache holds all max_seq_len
    positions, the context is cut to its newest half and read again: positions are
    absolute (learned, or rotations already applied to the cached keys) and cannot slide."""
    window = model.cfg.max_seq_len
    device = next(model.parameters()).device
    context, cache = list(ids[-window:]), None
    for _ in range(max_new_tokens):
        if cache is None:
            cache, fresh = model.new_cache(), context
        with (autocast or contextlib.nullcontext)():
            logits = model(torch.tensor([fresh], device=device), cache)[0, -1]  # (V,)
        token = pick(logits)
        yield token
        context.append(token)
        fresh = [token]
        if len(cache) == window:  # no position left for the next token
            context, cache = context[-(window // 2):], None


def picker(temperature: float, top_k: int, top_p: float, vocab_size: int,
           generator: torch.Generator) -> Callable[[torch.Tensor], int]:
    """The next id from logits (V,); ids from vocab_size on (the embedding's padding rows)
    are never picked."""
    def pick(logits: torch.Tensor) -> int:
        logits = logits[:vocab_size].float()
        if temperature == 0:
            return int(logits.argmax())
        logits = logits / temperature
        if 0 < top_k < vocab_size:
            logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], -math.inf)
        if top_p < 1:
            probs, order = torch.sort(torch.softmax(logits, dim=0), descending=True)
            beyond = probs.cumsum(0) - probs >= top_p  # the ids before already reach top_p
            logits[order[beyond]] = -math.inf
        return int(torch.multinomial(torch.softmax(logits, dim=0), 1, generator=generator))
    return pick
