"""model=gpt_*: GPT-2's decoder: pre-norm blocks, causal attention, GELU MLP, learned
positions, and an output head tied to the token embedding (with the exact GELU). Its
Hugging Face format is GPT2LMHeadModel's (trainrun/models/gpt_hf.py)."""

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
from trainrun.models import gpt_hf
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
class GPTConfig(ModelConfig):
    family: ClassVar[str] = "gpt"
    shape_keys: ClassVar[tuple[str, ...]] = ("d_model", "n_layers", "n_heads", "d_ff",
                                             "max_seq_len")
    default_option: ClassVar[str] = "gpt_tiny"
    hf: ClassVar = gpt_hf.ADAPTER
    masks_documents: ClassVar[bool] = True

    # d_model: width of the residual stream; max_seq_len: number of learned positions
    n_layers: int = MISSING
    n_heads: int = MISSING  # d_model must be a multiple of n_heads
    d_ff: int = MISSING  # hidden width of the MLP
    dropout: float = MISSING  # on embeddings, attention weights and residual branches

    def validate(self, prefix: str) -> None:
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            require_positive(f"{prefix}.{key}", getattr(self, key))
        require_heads(prefix, self.d_model, self.n_heads)
        require_range(f"{prefix}.dropout", self.dropout, 0.0, 0.99)
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError(f"{prefix}.init_from", f"empty; allowed: null, or {gpt_hf.ALLOWED}")

    def build(self, vocab_size: int) -> GPT:
        return GPT(self, vocab_size)

    def tiny(self) -> GPTConfig:
        return self.replace(d_model=8, n_layers=1, n_heads=1, d_ff=8, max_seq_len=4,
                            dropout=0.0, init_from=None)

    def num_params(self, vocab_size: int) -> int:
        """GPT(self, vocab_size).num_params(), without building it: token and position
        embeddings (the head is tied to the first), per block two LayerNorms, attention's
        qkv and output projections and the MLP's two layers with their biases, the final
        LayerNorm."""
        d, ff = self.d_model, self.d_ff
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
        return vocab_size * d + self.max_seq_len * d + self.n_layers * block + 2 * d

    def flops_per_token(self, vocab_size: int, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix:
        6 per non-embedding parameter (the tied head computes; positions do not) plus
        attention's 12·L·d·T."""
        n = self.num_params(vocab_size) - self.max_seq_len * self.d_model
        return 6 * n + 12 * self.n_layers * self.d_model * seq_len


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, extend: Extend | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if extend is not None:
            k, v = extend(k, v)  # (B, nh, T_past + T, hs): the cached positions, then these
        past = k.shape[2] - T
        p = self.dropout if self.training else 0.0
        if docs is not None:  # data.document_mask: within each document
            y = docs.attend(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(past, T, x.device),
                                               dropout_p=p, is_causal=past == 0)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, extend: Extend | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), extend, docs))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class GPT(MasksDocuments, nn.Module):
    """GPT-2's architecture over `vocab_size` ids. The embedding (tied with the output
    layer) has padded(vocab_size) rows, for faster matrix products; the logits of the
    padding ids are the lowest finite value, so that no softmax (loss, sampling, evaluation) gives them any
    probability, and their rows get no gradient from the loss. After mask_documents(eot),
    each document of a window attends only to itself, from position 0 (documents.py)."""

    def __init__(self, cfg: GPTConfig, vocab_size: int):
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
        check_length(past, T, self.cfg.max_seq_len)
        docs = self.documents(idx, cache, self.cfg.dropout, self.cfg.d_model // self.cfg.n_heads)
        # (T,) or, masking documents, (B, T): each token's position in its document
        pos = torch.arange(past, past + T, device=idx.device) if docs is None else docs.positions
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else partial(cache.extend, i), docs)
        logits = self.head(self.ln_f(x))
        return mask_padding(logits, self.padding) if self.padded else logits

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def shard_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def num_params(self) -> int:
        """Parameters counted once (the tied head is the token embedding), the embedding's
        padding rows left out: they compute nothing."""
        padding = (self.tok_emb.num_embeddings - self.vocab_size) * self.cfg.d_model
        return sum(p.numel() for p in self.parameters()) - padding

    def flops_per_token(self, seq_len: int) -> int:
        return self.cfg.flops_per_token(self.vocab_size, seq_len)
