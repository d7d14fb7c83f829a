"""Document masking (`data.document_mask=true`, docs/data.md): a packed window's attention
made block-diagonal by document, and positions that restart at each document.

A decoder told the end-of-document id (`mask_documents(eot)`) finds the documents in its
own input ids, so the batches stay (inputs, targets) whatever data made them. A new
document begins AT each end-of-document id of the input: the id is the next document's
first token, the context it is read after (as trainrun-eval's Windows and trainrun-sample
read a document, after one end-of-document id). The window `a b c EOT d e f EOT g` holds
the documents [a b c] [EOT d e f] [EOT g]; each token attends to the tokens of its own
document up to itself, at positions 0, 1, ... from its document's start, so the window's
loss is the sum of its documents' losses, each read alone.

On CUDA, where torch has flex_attention, the mask is a BlockMask and attention a compiled
flex_attention, which skips the blocks of (query, key) tiles that lie wholly across
documents; elsewhere (the CPU, dropout in training, which flex_attention lacks, heads
narrower than its kernels take) it is a boolean (B, 1, T, T) mask given to
scaled_dot_product_attention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # a torch without flex_attention: the boolean mask everywhere
    BlockMask = create_block_mask = flex_attention = None


@dataclass
class Documents:
    """Where the documents of a batch of windows lie."""

    positions: torch.Tensor  # (B, T) each token's position in its document, from 0
    mask: torch.Tensor | BlockMask  # (B, 1, T, T) bool, True: may attend; or flex's BlockMask
    _additive: dict = field(default_factory=dict)  # dtype -> the mask as 0 / -inf (additive)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               enable_gqa: bool = False) -> torch.Tensor:
        """Causal attention within documents: q (B, nh, T, hs), k and v (B, n_kv, T, hs)
        -> (B, nh, T, hs)."""
        if isinstance(self.mask, torch.Tensor):
            if enable_gqa and q.is_cuda:  # SDPA's kernels that take a mask lack grouped heads
                repeat = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
                enable_gqa = False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.additive(q.dtype),
                                                  dropout_p=dropout_p, enable_gqa=enable_gqa)
        assert dropout_p == 0.0, "flex_attention has no dropout: documents(flex=False)"
        kernel = fused(flex_attention) if q.is_cuda else flex_attention  # eager: CPU tests
        return kernel(q, k, v, block_mask=self.mask, enable_gqa=enable_gqa)


    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The boolean mask as 0 / -inf in `dtype`, made once for every layer: SDPA would
        convert a boolean one to that at each call and keep each copy for the backward."""
        if dtype not in self._additive:
            self._additive[dtype] = torch.zeros(self.mask.shape, dtype=dtype,
                                                device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf"))
        return self._additive[dtype]


def documents(idx: torch.Tensor, eot: int, flex: bool = False) -> Documents:
    """The documents of the windows idx (B, T), a new one beginning at each `eot`; `flex`:
    the mask as flex_attention's BlockMask (needs flex_available())."""
    B, T = idx.shape
    t = torch.arange(T, device=idx.device)
    # the index where each token's document begins: the latest eot at or before it, else 0
    start = torch.where(idx == eot, t, 0).cummax(dim=1).values  # (B, T)
    if flex:
        def same_document(b, h, q_idx, kv_idx):
            return (kv_idx >= start[b, q_idx]) & (kv_idx <= q_idx)

        make = fused(create_block_mask) if idx.is_cuda else create_block_mask
        mask = make(same_document, B, None, T, T, device=idx.device)
    else:  # key j is seen by query i when start[i] <= j <= i
        mask = ((t[None, None, :] >= start[:, :, None]) & (t[None, None, :] <= t[None, :, None]))
        mask = mask.unsqueeze(1)  # (B, 1, T, T): the same for every head
    return Documents(t - start, mask)


FLEX_MIN_HEAD = 16  # flex_attention's CUDA kernels (Triton's tl.dot) need heads this wide


def flex_available(device: torch.device, head_dim: int) -> bool:
    """Whether a model on `device` with heads of head_dim masks documents with
    flex_attention: CUDA, with a torch that has it, and heads of 16 dimensions or more."""
    return device.type == "cuda" and flex_attention is not None and head_dim >= FLEX_MIN_HEAD


def fused(function):
    """flex_attention or create_block_mask compiled, as torchtitan does: uncompiled they
    materialize the (T, T) scores and mask that they exist to avoid. Within a compiled
    model (trainer.compile=true) the function itself: the model's compilation fuses it."""
    return function if torch.compiler.is_compiling() else compiled(function)


@functools.cache
def compiled(function):
    """function compiled once per process."""
    return torch.compile(function)


class MasksDocuments:
    """What a decoder family's module mixes in to support data.document_mask:
    `mask_documents(eot)` turns it on (None: off, the default), and
    `documents(idx, cache, dropout, head_dim)` gives forward the Documents of its input, or None for plain causal attention: masking
    off, or a KV cache (generation reads one document, its prompt after one end-of-document
    id)."""

    eot: int | None = None

    def mask_documents(self, eot: int | None) -> None:
        self.eot = eot

    def documents(self, idx: torch.Tensor, cache, dropout: float,
                  head_dim: int) -> Documents | None:
        if self.eot is None or cache is not None:
            return None
        flex = flex_available(idx.device, head_dim) and not (self.training and dropout > 0)
        return documents(idx, self.eot, flex)
