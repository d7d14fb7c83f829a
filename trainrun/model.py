"""A decoder-only Transformer: pre-norm blocks, causal attention, GELU MLP, learned
positions, and an output head tied to the token embedding (GPT-2's architecture, with the
exact GELU). `KVCache` lets generation feed one new position per forward pass."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive, require_range


@dataclass
class ModelConfig:
    d_model: int = MISSING  # width of the residual stream
    n_layers: int = MISSING
    n_heads: int = MISSING  # d_model must be a multiple of n_heads
    d_ff: int = MISSING  # hidden width of the MLP
    dropout: float = MISSING  # on embeddings, attention weights and residual branches
    max_seq_len: int = MISSING  # number of learned positions
    init_from: str | None = None  # a Hugging Face GPT-2 folder to start from (trainrun/gpt2.py)

    def validate(self, prefix: str) -> None:
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            require_positive(f"{prefix}.{key}", getattr(self, key))
        if self.d_model % self.n_heads:
            small = [h for h in range(1, math.isqrt(self.d_model) + 1) if self.d_model % h == 0]
            divisors = sorted({*small, *(self.d_model // h for h in small)})
            raise ConfigError(
                f"{prefix}.n_heads",
                f"{self.n_heads} does not divide {prefix}.d_model={self.d_model}; "
                f"allowed: a divisor of {self.d_model} ({', '.join(map(str, divisors))})",
            )
        require_range(f"{prefix}.dropout", self.dropout, 0.0, 0.99)
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError(f"{prefix}.init_from", "empty; allowed: null, or a Hugging Face "
                                                     "GPT-2 folder (config.json, model.safetensors)")


    def num_params(self, vocab_size: int) -> int:
        """GPT(self, vocab_size).num_params(), without building it: token and position
        embeddings (the head is tied to the first), per block two LayerNorms, attention's
        qkv and output projections and the MLP's two layers with their biases, the final
        LayerNorm."""
        d, ff = self.d_model, self.d_ff
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
        return vocab_size * d + self.max_seq_len * d + self.n_layers * block + 2 * d


# appends a block's new keys and values (B, nh, T, hs) to its cache; returns all of them
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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, extend: Extend | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if extend is not None:
            k, v = extend(k, v)  # (B, nh, T_past + T, hs): the cached positions, then these
        past = k.shape[2] - T
        # new position t sees every cached one and the new ones up to itself
        mask = None if past == 0 else torch.ones(T, past + T, dtype=torch.bool,
                                                 device=x.device).tril(past)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                           is_causal=past == 0)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, extend: Extend | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), extend))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


PAD_MULTIPLE = 64  # embedding rows: the vocabulary padded up to a multiple of it


def padded(vocab_size: int) -> int:
    """The embedding rows of a model with vocab_size real ids."""
    return -(-vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE


class GPT(nn.Module):
    """GPT-2's architecture over `vocab_size` ids. The embedding (tied with the output
    layer) has padded(vocab_size) rows, for faster matrix products; the logits of the
    padding ids are the lowest finite value, so that no softmax (loss, sampling, evaluation) gives them any
    probability, and their rows get no gradient from the loss."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        rows = padded(vocab_size)
        self.padded = rows > vocab_size
        self.register_buffer("padding", torch.arange(rows) >= vocab_size, persistent=False)
        self.tok_emb = nn.Embedding(rows, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, rows, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        self.apply(self._init)
        # GPT-2: residual projections scaled down by the depth of the residual stream
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, padded(vocab_size)). With a cache, idx continues
        the positions it holds (T_past .. T_past + T - 1), and their keys and values are
        added to it."""
        past, T = (0 if cache is None else len(cache)), idx.shape[1]
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens; the model has "
                             f"{self.cfg.max_seq_len} positions")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else partial(cache.extend, i))
        logits = self.head(self.ln_f(x))
        if not self.padded:
            return logits
        # the lowest finite value rather than -inf: no softmax gives it any probability
        # (exp underflows to 0), and differences of logits stay finite; in place, as the
        # head's backward needs its inputs, not its output: no second (B, T, V) tensor
        return logits.masked_fill_(self.padding, torch.finfo(logits.dtype).min)

    def num_params(self) -> int:
        """Parameters counted once (the tied head is the token embedding), the embedding's
        padding rows left out: they compute nothing."""
        padding = (self.tok_emb.num_embeddings - self.vocab_size) * self.cfg.d_model
        return sum(p.numel() for p in self.parameters()) - padding

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix:
        6 per non-embedding parameter plus attention's 12·L·d·T."""
        n = self.num_params() - self.pos_emb.weight.numel()
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len


KINDS = ("bias", "norm", "embedding", "weight")  # what parameter_kinds() tells apart


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """Each parameter's name -> its kind: `embedding`, `norm`, `bias` or `weight`.

    The optimizer uses the kinds to keep weight decay off biases, norm gains and
    embeddings; AGC and LARS use them to leave biases and norms alone.
    """
    # A parameter shared by several modules (the head tied to the token embedding) is
    # named as named_parameters() names it, by its first owner, and is an embedding if
    # any owner is one, whatever order the modules were registered in.
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                  for p in m.parameters(recurse=False)}
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
