"""What every model family provides: its config's contract (ModelConfig), the key-value
cache of generation, the embedding's padding rows, and the parameter kinds.

A family is a config schema (a dataclass extending ModelConfig, `schemas/model/<family>`)
whose `build(vocab_size)` returns an nn.Module with this interface:

    forward(idx (B, T), cache=None) -> logits (B, T, padded(vocab_size)), the padding ids'
        logits the lowest finite value; with a cache, idx continues its positions
    cfg, vocab_size          the config it was built from, the real ids
    new_cache()              an empty KVCache for generation
    shard_units()            the submodules FSDP2 shards on their own (the blocks)
    num_params()             parameters counted once, the padding rows left out
    flops_per_token(seq_len) training FLOPs per token, for MFU
    head                     the output layer (an embedding kind: no weight decay, no Muon)
    mask_documents(eot)      where the config's masks_documents: each document of a window
                             (one begins at each eot id) attends only to itself, from
                             position 0 (data.document_mask; documents.MasksDocuments)

A family of task "translation" (seq2seq.py) reads a source too: its forward is
forward(src (B, S), src_lengths (B,), tgt (B, T)) -> logits (B, T, padded(vocab_size)), and
it decodes with encode/decode (trainrun/decoding.py) rather than forward's cache.

The runner, resume, the memory check, the commands after training and the benchmark use
only this interface and ModelConfig's; tests/test_model_families.py checks it for every
family in MODELS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from omegaconf import MISSING

from trainrun.errors import ConfigError
from trainrun.models.hf import Adapter


@dataclass
class ModelConfig:
    """The keys every family has, and what the rest of trainrun asks of a family."""

    family: ClassVar[str]  # `model.family` in meta.json; the schema is schemas/model/<family>
    # the keys whose change makes a checkpoint another model (resume refuses them)
    shape_keys: ClassVar[tuple[str, ...]]
    hf: ClassVar[Adapter | None] = None  # its Hugging Face format, or None (no export)
    # the option model.init_from chooses for a folder of this family when none is given
    default_option: ClassVar[str]
    # lm: forward(idx) over one stream; translation: forward(src, src_lengths, tgt)
    task: ClassVar[str] = "lm"
    # data.document_mask: its module has mask_documents(eot) (models/documents.py)
    masks_documents: ClassVar[bool] = False

    d_model: int = MISSING  # width of the residual stream (noam's default d_model)
    max_seq_len: int = MISSING  # the longest sequence the model reads
    init_from: str | None = None  # a Hugging Face folder of the family's format to start from

    def validate(self, prefix: str) -> None:
        raise NotImplementedError

    def build(self, vocab_size: int) -> nn.Module:
        """The module over vocab_size ids, initialized from torch's (seeded) generator."""
        raise NotImplementedError

    def num_params(self, vocab_size: int) -> int:
        """build(vocab_size).num_params(), without building it."""
        raise NotImplementedError

    def tiny(self) -> ModelConfig:
        """A model of this family small enough to build in a millisecond (the memory
        check measures optimizer state on it)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The shape in words, for the console: `d_model 128, n_layers 4, ...`."""
        return ", ".join(f"{k} {getattr(self, k)}" for k in self.shape_keys)

    def check_init_from(self, vocab_size: int) -> None:
        """Refuse (ConfigError naming model.init_from) a folder this model cannot start
        from: another format, shape or vocabulary."""
        if self.hf is None:
            raise ConfigError("model.init_from", f"model family {self.family} has no Hugging "
                                                 f"Face format to start from; allowed: null")
        self.hf.check(self, vocab_size)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# appends a block's new keys and values (B, n_kv, T, hs) to its cache; returns all of them
Extend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVCache:
    """The keys and values of the positions a model has already read, per block, each
    (B, nh, T_past, hs): with it, generating a token is a forward pass of one position."""

    def __init__(self, n_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    def __len__(self) -> int:
        """T_past, the positions cached."""
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def extend(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layers[i] is not None:
            k = torch.cat((self.layers[i][0], k), dim=2)
            v = torch.cat((self.layers[i][1], v), dim=2)
        self.layers[i] = (k, v)
        return k, v

    def select(self, order: torch.Tensor) -> None:
        """Keep the rows `order` (N,) of every cached tensor, in that order: beam search
        follows each hypothesis back to the row it grew from."""
        self.layers = [None if kv is None else (kv[0].index_select(0, order),
                                                kv[1].index_select(0, order))
                       for kv in self.layers]


def causal_mask(past: int, T: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask of T new positions after `past` cached ones: new position t sees
    every cached one and the new ones up to itself; None when nothing is cached (SDPA's
    is_causal does it faster)."""
    if past == 0:
        return None
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)


def check_length(past: int, T: int, max_seq_len: int) -> None:
    if past + T > max_seq_len:
        raise ValueError(f"sequence of {past + T} tokens; the model has {max_seq_len} positions")


def require_heads(prefix: str, d_model: int, n_heads: int) -> None:
    """n_heads must divide d_model (ConfigError listing the divisors)."""
    if d_model % n_heads:
        small = [h for h in range(1, math.isqrt(d_model) + 1) if d_model % h == 0]
        divisors = sorted({*small, *(d_model // h for h in small)})
        raise ConfigError(
            f"{prefix}.n_heads",
            f"{n_heads} does not divide {prefix}.d_model={d_model}; "
            f"allowed: a divisor of {d_model} ({', '.join(map(str, divisors))})",
        )


PAD_MULTIPLE = 64  # embedding rows: the vocabulary padded up to a multiple of it


def padded(vocab_size: int) -> int:
    """The embedding rows of a model with vocab_size real ids."""
    return -(-vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE


def mask_padding(logits: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """The padding ids' logits set to the lowest finite value rather than -inf: no softmax
    gives them any probability (exp underflows to 0), and differences of logits stay
    finite; in place, as the head's backward needs its inputs, not its output: no second
    (B, T, V) tensor."""
    return logits.masked_fill_(padding, torch.finfo(logits.dtype).min)


KINDS = ("bias", "norm", "embedding", "weight")  # what parameter_kinds() tells apart


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Each parameter's name -> its kind: `embedding`, `norm`, `bias` or `weight`.

    The optimizer uses the kinds to keep weight decay off biases, norm gains and
    embeddings; AGC and LARS use them to leave biases and norms alone; Muon steps only the
    `weight`s. The output layer (a model's `head`, tied to the token embedding or not) is
    an embedding: a row per token, as the input embedding.
    """
    # A parameter shared by several modules (the head tied to the token embedding) is
    # named as named_parameters() names it, by its first owner, and is an embedding if
    # any owner is one, whatever order the modules were registered in.
    rowwise = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        rowwise.append(head)
    embeddings = {id(p) for m in rowwise for p in m.parameters(recurse=False)}
    kinds, seen = {}, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(prefix=module_name, recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in embeddings:
                kinds[name] = "embedding"
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d)):
                kinds[name] = "norm"
            elif name.endswith("bias"):
                kinds[name] = "bias"
            else:
                kinds[name] = "weight"
    return kinds
