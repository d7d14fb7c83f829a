"""The decoder-only Transformer (docs/models.md): shapes, causality, the tied head, the
parameter kinds that weight decay and clipping rely on, the presets, dropout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import REPO, config
from omegaconf import OmegaConf

from trainrun.data.tokenizers import ByteTokenizer
from trainrun.models import GPT, GPTConfig, padded, parameter_kinds

VOCAB_SIZE = ByteTokenizer.vocab_size

# the gpt family's options (tests/test_model_families.py checks every family's)
PRESETS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")
                 if "/schemas/model/gpt@_here_" in p.read_text())


def small(**overrides) -> GPTConfig:
    values = dict(d_model=32, n_layers=2, n_heads=4, d_ff=48, dropout=0.0, max_seq_len=24)
    return GPTConfig(**{**values, **overrides})


def formula_count(cfg: GPTConfig, vocab: int) -> int:
    """Parameters of a GPT-2-style model, written out layer by layer (the head tied to
    the token embedding, so counted once)."""
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    embeddings = vocab * d + cfg.max_seq_len * d
    layer_norm = 2 * d  # gain and bias
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv, output projection (with biases)
    mlp = (d * f + f) + (f * d + d)
    return embeddings + L * (2 * layer_norm + attention + mlp) + layer_norm


@pytest.mark.parametrize("batch,seq,vocab,cfg", [
    (1, 1, VOCAB_SIZE, small()),
    (3, 24, VOCAB_SIZE, small()),  # seq = max_seq_len
    (2, 7, 11, small(d_model=24, n_heads=3, n_layers=1, d_ff=16)),
    (4, 5, 300, small(n_heads=1, n_layers=3)),
])
def test_logits_have_shape_batch_time_vocab(batch, seq, vocab, cfg):
    torch.manual_seed(0)
    model = GPT(cfg, vocab)
    logits = model(torch.randint(0, vocab, (batch, seq)))
    rows = -(-vocab // 64) * 64  # the vocabulary padded up to a multiple of 64
    assert logits.shape == (batch, seq, rows) and model.tok_emb.num_embeddings == rows
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits[..., :vocab]).all()
    assert (logits[..., vocab:] == torch.finfo(logits.dtype).min).all()  # never wins a softmax
    assert (torch.softmax(logits, -1)[..., vocab:] == 0).all()


def test_longer_sequence_than_positions_is_refused():
    model = GPT(small(max_seq_len=8), VOCAB_SIZE)
    with pytest.raises(ValueError, match="8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_later_token_never_changes_earlier_logits(dropout):
    torch.manual_seed(0)
    cfg = small(dropout=dropout, n_layers=3)
    model = GPT(cfg, VOCAB_SIZE).eval()
    x = torch.randint(0, VOCAB_SIZE, (2, cfg.max_seq_len))
    with torch.no_grad():
        before = model(x)
        for p in (0, 1, 5, 12, cfg.max_seq_len - 1):
            changed = x.clone()
            changed[:, p] = (x[:, p] + 1 + torch.arange(2)) % VOCAB_SIZE
            after = model(changed)
            torch.testing.assert_close(after[:, :p], before[:, :p], rtol=0, atol=1e-6)
            # the changed position itself does see its own token: the check can fail
            assert (after[:, p] - before[:, p]).abs().max() > 1e-3


def test_head_is_the_token_embedding():
    model = GPT(small(), VOCAB_SIZE)
    assert model.head.weight is model.tok_emb.weight
    assert model.head.bias is None
    with torch.no_grad():
        model.tok_emb.weight[3].fill_(0.5)
    assert torch.equal(model.head.weight[3], torch.full((32,), 0.5))
    # one tensor, one gradient: the head's and the embedding's contributions add up
    model(torch.tensor([[3, 4, 5]])).sum().backward()
    assert model.head.weight.grad is model.tok_emb.weight.grad
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "head.weight" not in names


def test_num_params_counts_the_tied_weight_once():
    cfg = small()
    model = GPT(cfg, VOCAB_SIZE)
    unique = {id(p): p.numel() for m in model.modules() for p in m.parameters(recurse=False)}
    padding = (padded(VOCAB_SIZE) - VOCAB_SIZE) * cfg.d_model  # rows that compute nothing
    assert model.num_params() == sum(unique.values()) - padding == formula_count(cfg, VOCAB_SIZE)
    assert model.num_params() < sum(p.numel() for m in model.modules()
                                    for p in m.parameters(recurse=False))


def expected_kind(name: str) -> str:
    """The kind of a parameter of GPT by its name (an independent reading of model.py's
    module names)."""
    if name in ("tok_emb.weight", "pos_emb.weight"):
        return "embedding"
    if name.startswith("ln_f.") or ".ln_" in name:
        return "norm"
    return "bias" if name.endswith(".bias") else "weight"


def test_parameter_kinds_classifies_every_parameter_once():
    cfg = small(n_layers=3)
    model = GPT(cfg, VOCAB_SIZE)
    kinds = parameter_kinds(model)
    params = dict(model.named_parameters())
    assert kinds == {name: expected_kind(name) for name in params}
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in ("embedding", "norm", "bias", "weight")}
    # per layer: 2 LayerNorms (gain + bias), 4 Linear layers (weight + bias); then ln_f
    assert counts == {"embedding": 2, "norm": 2 * (2 * cfg.n_layers + 1),
                      "bias": 4 * cfg.n_layers, "weight": 4 * cfg.n_layers}
    padding = (padded(VOCAB_SIZE) - VOCAB_SIZE) * cfg.d_model
    assert sum(params[n].numel() for n in kinds) == model.num_params() + padding
    assert all(params[n].ndim == 1 for n, k in kinds.items() if k in ("bias", "norm"))


def test_tied_weight_is_an_embedding_whatever_the_module_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 10, bias=False)  # registered before the embedding
            self.norm = nn.LayerNorm(8)
            self.emb = nn.Embedding(10, 8)
            self.head.weight = self.emb.weight

    model = HeadFirst()
    assert parameter_kinds(model) == {
        "head.weight": "embedding", "norm.weight": "norm", "norm.bias": "norm"}
    assert set(parameter_kinds(model)) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_builds_and_counts_by_the_formula(preset):
    assert {"gpt_tiny", "gpt_small", "gpt2_124m"} <= set(PRESETS)
    cfg = config(f"model={preset}").model
    yaml = OmegaConf.load(Path(REPO / "conf" / "model" / f"{preset}.yaml"))
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "max_seq_len"):
        assert getattr(cfg, key) == yaml[key], key
    with torch.device("meta"):  # the shapes without allocating the weights
        model = GPT(cfg, VOCAB_SIZE)
    assert model.num_params() == formula_count(cfg, VOCAB_SIZE)
    assert len(model.blocks) == cfg.n_layers
    assert model.blocks[0].attn.n_heads == cfg.n_heads
    assert model.blocks[0].mlp.fc.out_features == cfg.d_ff


def test_gpt2_124m_is_gpt2_small_with_gpt2s_vocabulary():
    cfg = config("model=gpt2_124m").model
    with torch.device("meta"):
        gpt2 = GPT(cfg, 50257)
        byte_level = GPT(cfg, VOCAB_SIZE)
    assert gpt2.num_params() == 124_439_808  # GPT-2 small as published by OpenAI/HF
    assert byte_level.num_params() == 124_439_808 - (50257 - VOCAB_SIZE) * cfg.d_model


def test_gpt_tiny_runs_forward_and_backward():
    cfg = config().model  # the default preset
    model = GPT(cfg, VOCAB_SIZE)
    x = torch.randint(0, VOCAB_SIZE, (2, cfg.max_seq_len))
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    with_dropout = GPT(small(dropout=0.5), VOCAB_SIZE)
    without = GPT(small(dropout=0.0), VOCAB_SIZE)
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randint(0, VOCAB_SIZE, (2, 16))

    with_dropout.train()
    a, b = with_dropout(x), with_dropout(x)
    assert (a - b).abs().max() > 1e-3  # a fresh mask each forward pass
    assert (a - without(x)).abs().max() > 1e-3

    with_dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(with_dropout(x), with_dropout(x), rtol=0, atol=0)
        torch.testing.assert_close(with_dropout(x), without.eval()(x), rtol=0, atol=1e-6)
