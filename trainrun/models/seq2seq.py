"""model=transformer_*: the encoder-decoder Transformer of "Attention Is All You Need":
embeddings scaled by √d_model plus sinusoidal (or learned) positions, an encoder of
self-attention and ReLU MLP layers, a decoder of causal self-attention, cross-attention over
the encoder's output and MLP layers, post-norm as in the paper or pre-norm, and one
embedding shared by source, target and the output layer (a shared vocabulary) or three.
It has no Hugging Face format. Decoding (greedy, beam search) is trainrun/decoding.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import MISSING

from trainrun.errors import ConfigError, require_in, require_positive, require_range
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

POSITIONS = ("sinusoidal", "learned")
KeysValues = tuple[torch.Tensor, torch.Tensor]  # each (B, nh, S, hs)
# a decoder layer's cross-attention keys and values of the memory, from a cache or computed
Remember = Callable[[Callable[[torch.Tensor], KeysValues], torch.Tensor], KeysValues]
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class Seq2SeqConfig(ModelConfig):
    family: ClassVar[str] = "seq2seq"
    task: ClassVar[str] = "translation"
    shape_keys: ClassVar[tuple[str, ...]] = (
        "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads", "d_ff", "max_seq_len",
        "positions", "norm_first", "tie_embeddings")
    default_option: ClassVar[str] = "transformer_tiny"
    hf: ClassVar = None

    # d_model: width of the residual stream; max_seq_len: the positions of a source and
    # of a target (bos included)
    n_encoder_layers: int = MISSING
    n_decoder_layers: int = MISSING
    n_heads: int = MISSING  # d_model must be a multiple of n_heads
    d_ff: int = MISSING  # hidden width of the MLP
    dropout: float = MISSING  # on embeddings, attention weights and residual branches
    positions: str = "sinusoidal"  # sinusoidal (computed, the paper's) | learned
    norm_first: bool = True  # pre-norm (stabler); false: the paper's post-norm
    tie_embeddings: bool = True  # one embedding for source, target and output layer
    activation: str = "relu"  # the MLP's: relu (the paper's) | gelu

    def validate(self, prefix: str) -> None:
        for key in ("d_model", "n_encoder_layers", "n_decoder_layers", "n_heads", "d_ff",
                    "max_seq_len"):
            require_positive(f"{prefix}.{key}", getattr(self, key))
        require_heads(prefix, self.d_model, self.n_heads)
        require_range(f"{prefix}.dropout", self.dropout, 0.0, 0.99)
        require_in(f"{prefix}.positions", self.positions, POSITIONS)
        require_in(f"{prefix}.activation", self.activation, tuple(ACTIVATIONS))
        if self.init_from is not None:
            raise ConfigError(f"{prefix}.init_from", f"model family {self.family} has no "
                                                     f"Hugging Face format to start from; "
                                                     f"allowed: null")

    def build(self, vocab_size: int) -> Seq2Seq:
        return Seq2Seq(self, vocab_size)

    def tiny(self) -> Seq2SeqConfig:
        return self.replace(d_model=8, n_encoder_layers=1, n_decoder_layers=1, n_heads=1,
                            d_ff=8, max_seq_len=4, dropout=0.0, init_from=None)

    def layer_params(self) -> tuple[int, int]:
        """Parameters of an encoder layer and of a decoder layer: attention's projections
        (4 d×d with biases: self-attention's and cross-attention's alike), the MLP's two
        layers with biases, a LayerNorm per sublayer."""
        d, ff = self.d_model, self.d_ff
        attention = 4 * d * d + 4 * d
        mlp = d * ff + ff + ff * d + d
        return attention + mlp + 2 * 2 * d, 2 * attention + mlp + 3 * 2 * d

    def num_params(self, vocab_size: int) -> int:
        """Seq2Seq(self, vocab_size).num_params(), without building it: the embedding (or
        source, target and output matrices), learned positions of encoder and decoder,
        the layers, and the final LayerNorms of pre-norm."""
        d = self.d_model
        encoder, decoder = self.layer_params()
        embeddings = (1 if self.tie_embeddings else 3) * vocab_size * d
        positions = 2 * self.max_seq_len * d if self.positions == "learned" else 0
        final = 2 * 2 * d if self.norm_first else 0
        return (embeddings + positions + self.n_encoder_layers * encoder
                + self.n_decoder_layers * decoder + final)

    def flops_per_token(self, vocab_size: int, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per target token of a pair whose source and
        target are both seq_len long, as in the PaLM appendix: 6 per weight of a matrix
        product (the encoder's once per source token, as many as target tokens; the output
        layer's; not the lookups, nor biases and norms, whose elementwise work is not 6 per
        parameter) plus attention's 12·d·T per layer for encoder self-attention, decoder
        self-attention and cross-attention."""
        d, ff = self.d_model, self.d_ff
        encoder, decoder = 4 * d * d + 2 * d * ff, 8 * d * d + 2 * d * ff
        n = self.n_encoder_layers * encoder + self.n_decoder_layers * decoder + vocab_size * d
        attention_layers = self.n_encoder_layers + 2 * self.n_decoder_layers
        return 6 * n + 12 * attention_layers * d * seq_len

    def describe(self) -> str:
        return (f"d_model {self.d_model}, layers {self.n_encoder_layers}+{self.n_decoder_layers}"
                f", n_heads {self.n_heads}, d_ff {self.d_ff}, max_seq_len {self.max_seq_len}, "
                f"{self.positions} positions, {'pre' if self.norm_first else 'post'}-norm, "
                f"{'tied' if self.tie_embeddings else 'untied'} embeddings")


@dataclass
class Memory:
    """The encoder's output, read by every decoder layer's cross-attention."""

    states: torch.Tensor  # (B, S, d)
    padding: torch.Tensor  # (B, S) bool: True at the positions past a source's length

    def select(self, order: torch.Tensor) -> Memory:
        """The rows `order` (N,) (beam search repeats and reorders sentences)."""
        return Memory(self.states.index_select(0, order), self.padding.index_select(0, order))

    @property
    def attn_mask(self) -> torch.Tensor:
        """SDPA's boolean mask (B, 1, 1, S): True where a key takes part."""
        return ~self.padding[:, None, None, :]


class Seq2SeqCache(KVCache):
    """KVCache's self-attention keys and values per decoder layer, and the cross-attention
    keys and values of the memory, computed at a decode's first call only."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self.cross: list[KeysValues | None] = [None] * n_layers

    def remember(self, i: int, compute: Callable[[torch.Tensor], KeysValues],
                 states: torch.Tensor) -> KeysValues:
        """Decoder layer i's cross-attention keys and values: compute(states) at the first
        call, kept for the next ones."""
        if self.cross[i] is None:
            self.cross[i] = compute(states)
        return self.cross[i]

    def select(self, order: torch.Tensor) -> None:
        super().select(order)
        self.cross = [None if kv is None else (kv[0].index_select(0, order),
                                               kv[1].index_select(0, order))
                      for kv in self.cross]


def sinusoids(max_seq_len: int, d_model: int) -> torch.Tensor:
    """The paper's positions (max_seq_len, d): sin(pos / 10000^(2i/d)) in dimension 2i,
    cos of the same angle in 2i + 1."""
    angles = torch.outer(torch.arange(max_seq_len).float(),
                         torch.exp(torch.arange(0, d_model, 2).float()
                                   * (-math.log(10000.0) / d_model)))
    table = torch.zeros(max_seq_len, d_model)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : d_model // 2]
    return table


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs)."""
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, dropout: float) -> torch.Tensor:
    """SDPA over (B, nh, T, hs) queries and (B, nh, S, hs) keys -> (B, T, C)."""
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                       is_causal=causal)
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                extend: Extend | None = None) -> torch.Tensor:
        """mask: the encoder's key padding (B, 1, 1, T); causal: the decoder's, over the
        positions cached by `extend` and these."""
        T = x.shape[1]
        q, k, v = (heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=2))
        if extend is not None:
            k, v = extend(k, v)  # (B, nh, T_past + T, hs)
        past = k.shape[2] - T
        if causal:
            mask = causal_mask(past, T, x.device)
        p = self.dropout if self.training else 0.0
        return self.proj(attend(q, k, v, mask, causal and past == 0, p))


class CrossAttention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def keys_values(self, states: torch.Tensor) -> KeysValues:
        """The memory's keys and values, each (B, nh, S, hs)."""
        k, v = self.kv(states).chunk(2, dim=2)
        return heads(k, self.n_heads), heads(v, self.n_heads)

    def forward(self, x: torch.Tensor, memory: Memory,
                remember: Remember | None = None) -> torch.Tensor:
        """x's queries over the memory; its keys and values from `remember` (a cache) if
        given. (Computed here, in the layer's forward: FSDP gathers its weights only then.)"""
        states = memory.states
        kv = self.keys_values(states) if remember is None else remember(self.keys_values, states)
        p = self.dropout if self.training else 0.0
        return self.proj(attend(heads(self.q(x), self.n_heads), *kv, memory.attn_mask, False, p))


class MLP(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.activation = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class Residual(nn.Module):
    """A sublayer with its residual connection, dropout and LayerNorm: x + f(norm(x))
    pre-norm, norm(x + f(x)) post-norm (the paper's)."""

    def __init__(self, cfg: Seq2SeqConfig, sublayer: nn.Module):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.norm = nn.LayerNorm(cfg.d_model)
        self.sublayer = sublayer
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.norm_first:
            return x + self.drop(self.sublayer(self.norm(x), *args, **kwargs))
        return self.norm(x + self.drop(self.sublayer(x, *args, **kwargs)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.attn = Residual(cfg, SelfAttention(cfg))
        self.mlp = Residual(cfg, MLP(cfg))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x, mask))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.attn = Residual(cfg, SelfAttention(cfg))
        self.cross = Residual(cfg, CrossAttention(cfg))
        self.mlp = Residual(cfg, MLP(cfg))

    def forward(self, x: torch.Tensor, memory: Memory, extend: Extend | None = None,
                remember: Remember | None = None) -> torch.Tensor:
        x = self.attn(x, causal=True, extend=extend)
        return self.mlp(self.cross(x, memory, remember))


class Seq2Seq(nn.Module):
    """The encoder-decoder Transformer over `vocab_size` ids, shared by source and target.
    The embedding and the head have padded(vocab_size) rows; the padding ids' logits are
    the lowest finite value, so that no softmax gives them any probability.

        forward(src (B, S), src_lengths (B,), tgt (B, T)) -> logits (B, T, padded(V))
        encode(src, src_lengths) -> Memory, once per batch of sentences
        decode(tgt, memory, cache=None) -> logits; with a cache, tgt continues its positions

    Source positions from src_lengths on are padding, whatever their ids: no position
    reads them. src_lengths must be >= 1."""

    def __init__(self, cfg: Seq2SeqConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        d, rows = cfg.d_model, padded(vocab_size)
        self.padded = rows > vocab_size
        self.register_buffer("padding", torch.arange(rows) >= vocab_size, persistent=False)
        self.scale = math.sqrt(d)
        self.tgt_emb = nn.Embedding(rows, d)
        self.src_emb = self.tgt_emb if cfg.tie_embeddings else nn.Embedding(rows, d)
        if cfg.positions == "learned":
            self.src_pos = nn.Embedding(cfg.max_seq_len, d)
            self.tgt_pos = nn.Embedding(cfg.max_seq_len, d)
        else:
            self.register_buffer("sinusoids", sinusoids(cfg.max_seq_len, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # pre-norm leaves the residual stream unnormalized: a LayerNorm ends each stack
        self.encoder_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        self.head = nn.Linear(d, rows, bias=False)
        self._init()
        if cfg.tie_embeddings:
            self.head.weight = self.tgt_emb.weight

    def _init(self) -> None:
        """fairseq's: Xavier-uniform matrices, zero biases, embeddings normal(0, 1/√d) so
        that √d times one has unit variance (and a tied head gives logits of unit scale)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
        nn.init.normal_(self.head.weight, mean=0.0, std=self.cfg.d_model ** -0.5)

    def embed(self, ids: torch.Tensor, past: int, side: str) -> torch.Tensor:
        """Token embeddings × √d plus the positions past .. past + T - 1, with dropout."""
        T = ids.shape[1]
        check_length(past, T, self.cfg.max_seq_len)
        table = self.src_emb if side == "src" else self.tgt_emb
        if self.cfg.positions == "learned":
            pos_emb = self.src_pos if side == "src" else self.tgt_pos
            pos = pos_emb(torch.arange(past, past + T, device=ids.device))
        else:
            pos = self.sinusoids[past:past + T]
        return self.drop(table(ids) * self.scale + pos)  # (B, T, d)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Memory:
        """src (B, S) ids, src_lengths (B,) -> the encoder's output and its padding."""
        padding = torch.arange(src.shape[1], device=src.device) >= src_lengths[:, None]
        x = self.embed(src.masked_fill(padding, 0), 0, "src")  # padding's ids: any
        mask = ~padding[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, mask)
        return Memory(self.encoder_norm(x), padding)

    def decode(self, tgt: torch.Tensor, memory: Memory,
               cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """tgt (B, T) ids -> logits (B, T, padded(vocab_size)). With a cache, tgt continues
        the positions it holds and their keys and values are added to it; the memory's
        keys and values are computed at its first call and kept."""
        past = 0 if cache is None else len(cache)
        x = self.embed(tgt, past, "tgt")
        for i, layer in enumerate(self.decoder):
            if cache is None:
                x = layer(x, memory)
            else:
                x = layer(x, memory, partial(cache.extend, i), partial(cache.remember, i))
        logits = self.head(self.decoder_norm(x))
        return mask_padding(logits, self.padding) if self.padded else logits

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor,
                tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the logits of every target position given the source."""
        return self.decode(tgt, self.encode(src, src_lengths))

    def new_cache(self) -> Seq2SeqCache:
        return Seq2SeqCache(self.cfg.n_decoder_layers)

    def shard_units(self) -> list[nn.Module]:
        return [*self.encoder, *self.decoder]

    def num_params(self) -> int:
        """Parameters counted once (tied: one embedding), the padding rows of each matrix
        with a row per id left out: they compute nothing."""
        rows = self.tgt_emb.num_embeddings - self.vocab_size
        padding = rows * self.cfg.d_model * (1 if self.cfg.tie_embeddings else 3)
        return sum(p.numel() for p in self.parameters()) - padding

    def flops_per_token(self, seq_len: int) -> int:
        return self.cfg.flops_per_token(self.vocab_size, seq_len)
