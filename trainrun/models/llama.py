"""model=llama_*: a Llama-style decoder: pre-norm blocks with RMSNorm, rotary positions,
grouped-query attention, a SwiGLU MLP, no biases, the output head tied to the token
embedding or not, and an optional QK-norm. Its Hugging Face format is LlamaForCausalLM's
(trainrun/models/llama_hf.py); the rotary layout is transformers' (rotate_half: the first
half of a head's dimensions pairs with the second half)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_positive, require_range
from trainrun.models import llama_hf
from trainrun.models.base import (
    Extend,
    KVCache,
    ModelConfig,
    causal_mask,
    check_length,
    mask_padding,
    padded,
    require_heads,
)
from trainrun.models.documents import Documents, MasksDocuments


@dataclass
class LlamaConfig(ModelConfig):
    family: ClassVar[str] = "llama"
    shape_keys: ClassVar[tuple[str, ...]] = ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                             "d_ff", "max_seq_len", "tie_embeddings", "qk_norm")
    default_option: ClassVar[str] = "llama_tiny"
    hf: ClassVar = llama_hf.ADAPTER
    masks_documents: ClassVar[bool] = True

    # d_model: width of the residual stream; max_seq_len: the rotary positions precomputed
    n_layers: int = MISSING
    n_heads: int = MISSING  # query heads; d_model / n_heads (the head size) must be even
    n_kv_heads: int | None = MISSING  # key/value heads, dividing n_heads; null: n_heads
    d_ff: int | None = MISSING  # SwiGLU's hidden width; null: 8/3 d_model up to d_ff_multiple
    d_ff_multiple: int = 64
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    tie_embeddings: bool = MISSING  # the head is the token embedding
    qk_norm: bool = False  # RMSNorm of each head's queries and keys, before the rotation
    dropout: float = MISSING  # on attention weights and residual branches

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        """SwiGLU's hidden width: d_ff, or 8/3 d_model rounded up to d_ff_multiple."""
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model) // (3 * self.d_ff_multiple)) * self.d_ff_multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, prefix: str) -> None:
        for key in ("d_model", "n_layers", "n_heads", "max_seq_len", "d_ff_multiple"):
            require_positive(f"{prefix}.{key}", getattr(self, key))
        for key in ("n_kv_heads", "d_ff"):
            if getattr(self, key) is not None:
                require_positive(f"{prefix}.{key}", getattr(self, key))
        require_heads(prefix, self.d_model, self.n_heads)
        if self.n_heads % self.kv_heads:
            divisors = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
            raise ConfigError(f"{prefix}.n_kv_heads", f"{self.kv_heads} does not divide "
                                                      f"{prefix}.n_heads={self.n_heads}; allowed: "
                                                      f"{', '.join(map(str, divisors))}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.n_heads", f"{self.n_heads} gives heads of "
                                                   f"{self.head_dim} dimensions "
                                                   f"(d_model={self.d_model} / n_heads), which "
                                                   f"rotary positions cannot pair; allowed: "
                                                   f"n_heads giving an even head size")
        if not self.rope_theta > 1:
            raise ConfigError(f"{prefix}.rope_theta", f"got {self.rope_theta}; allowed: a "
                                                      f"number above 1 (10000 in Llama 2)")
        require_range(f"{prefix}.norm_eps", self.norm_eps, 1e-12, 1.0)
        require_range(f"{prefix}.dropout", self.dropout, 0.0, 0.99)
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError(f"{prefix}.init_from", f"empty; allowed: null, or "
                                                     f"{llama_hf.ADAPTER.allowed}")

    def build(self, vocab_size: int) -> Llama:
        return Llama(self, vocab_size)

    def tiny(self) -> LlamaConfig:
        return self.replace(d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8,
                            max_seq_len=4, dropout=0.0, init_from=None)

    def num_params(self, vocab_size: int) -> int:
        """Llama(self, vocab_size).num_params(), without building it: the token embedding
        (and an untied head), per block two RMSNorms, the query, key, value and output
        projections and SwiGLU's three matrices (and QK-norm's gains), the final RMSNorm."""
        d, hd, ff = self.d_model, self.head_dim, self.hidden
        attention = 2 * d * self.n_heads * hd + 2 * d * self.kv_heads * hd
        block = 2 * d + attention + 3 * d * ff + (2 * hd if self.qk_norm else 0)
        heads = 1 if self.tie_embeddings else 2
        return heads * vocab_size * d + self.n_layers * block + d

    def flops_per_token(self, vocab_size: int, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6 per
        parameter that computes (all but an untied input embedding, a lookup) plus
        attention's 12·L·d·T."""
        lookup = 0 if self.tie_embeddings else vocab_size * self.d_model
        n = self.num_params(vocab_size) - lookup
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dimension (transformers' layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """cos and sin of every position's rotation angles, (max_seq_len, hs), computed in fp32
    as transformers does; not saved (they follow from the config)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float()
                                    / head_dim))
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs): each angle for both halves
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, past: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, hs) of positions past .. past + T - 1."""
        return self.cos[past:past + T], self.sin[past:past + T]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, hs) of the positions (B, T): one angle per token, the same
        for every head."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hs = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hs, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hs, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hs, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(self.hs, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hs, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                extend: Extend | None = None, docs: Documents | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # fp32 tables, q's (autocast) precision
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if extend is not None:
            k, v = extend(k, v)  # (B, n_kv, T_past + T, hs): the cached positions, then these
        past = k.shape[2] - T
        p, gqa = (self.dropout if self.training else 0.0), self.n_kv != self.n_heads
        if docs is not None:  # data.document_mask: within each document
            y = docs.attend(q, k, v, p, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(past, T, x.device),
                                               dropout_p=p, is_causal=past == 0,
                                               enable_gqa=gqa)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hs))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                extend: Extend | None = None, docs: Documents | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, extend, docs))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(MasksDocuments, nn.Module):
    """A Llama-style decoder over `vocab_size` ids. The embedding and the head have
    padded(vocab_size) rows, for faster matrix products; the padding ids' logits are the
    lowest finite value, so that no softmax gives them any probability. After
    mask_documents(eot), each document of a window attends only to itself, its rotations
    those of positions 0, 1, ... from its start (documents.py)."""

    def __init__(self, cfg: LlamaConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        rows = padded(vocab_size)
        self.padded = rows > vocab_size
        self.register_buffer("padding", torch.arange(rows) >= vocab_size, persistent=False)
        self.embed = nn.Embedding(rows, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, rows, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # as GPT-2: the projections onto the residual stream scaled down by its depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, padded(vocab_size)). With a cache, idx
        continues the positions it holds, and their keys and values are added to it."""
        past, T = (0 if cache is None else len(cache)), idx.shape[1]
        check_length(past, T, self.cfg.max_seq_len)
        x = self.embed(idx)  # (B, T, C)
        docs = self.documents(idx, cache, self.cfg.dropout, self.cfg.head_dim)
        cos, sin = self.rotary(past, T) if docs is None else self.rotary.at(docs.positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else partial(cache.extend, i), docs)
        logits = self.head(self.norm(x))
        return mask_padding(logits, self.padding) if self.padded else logits

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)

    def num_params(self) -> int:
        """Parameters counted once (a tied head is the token embedding), the padding rows
        of the embedding and an untied head left out: they compute nothing."""
        rows = self.embed.num_embeddings - self.vocab_size
        padding = rows * self.cfg.d_model * (1 if self.cfg.tie_embeddings else 2)
        return sum(p.numel() for p in self.parameters()) - padding

    def flops_per_token(self, seq_len: int) -> int:
        return self.cfg.flops_per_token(self.vocab_size, seq_len)
