"""The seq2seq family (trainrun/models/seq2seq.py) and its decoding (trainrun/decoding.py),
on tiny models: source padding reads as nothing, the decoder is causal, the cache equals
recomputation, beam search is exact where its beam holds every prefix, beam 1 is greedy,
and on a model trained to reverse its source, beam 4 scores at least greedy's."""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from helpers import model_config

from trainrun.decoding import beam_search, greedy, max_length
from trainrun.errors import ConfigError
from trainrun.models import Seq2SeqConfig, padded
from trainrun.models.seq2seq import Memory

VOCAB = 257
SMALL = dict(d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=2, d_ff=64,
             dropout=0.0, max_seq_len=64)
VARIANTS = [{}, {"norm_first": False}, {"positions": "learned"}, {"tie_embeddings": False},
            {"norm_first": False, "positions": "learned", "tie_embeddings": False,
             "activation": "gelu"}]


def small(**changes) -> Seq2SeqConfig:
    return model_config("model=transformer_tiny").replace(**{**SMALL, **changes})


def batch(vocab: int = VOCAB, seed: int = 0):
    """A source batch of lengths 10, 4, 7, 1 (ids past them: out of the vocabulary) and a
    target batch of 8 ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 4, 7, 1])
    src = torch.randint(0, vocab, (4, 10), generator=g)
    src = src.masked_fill(torch.arange(10) >= lengths[:, None], 10**6)
    return src, lengths, torch.randint(0, vocab, (4, 8), generator=g)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "default")
def test_forward_gives_logits_over_the_padded_vocabulary(variant):
    torch.manual_seed(0)
    model = small(**variant).build(VOCAB)
    logits = model(*batch())
    assert logits.shape == (4, 8, padded(VOCAB))
    assert (logits[..., VOCAB:] == torch.finfo(logits.dtype).min).all()
    assert logits[..., :VOCAB].isfinite().all()
    logits[..., :VOCAB].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "default")
def test_num_params_and_flops_equal_counting(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small(**variant)
    model = cfg.build(VOCAB)
    unique = {id(p): p for p in model.parameters()}.values()
    rows = (padded(VOCAB) - VOCAB) * cfg.d_model * (1 if cfg.tie_embeddings else 3)
    assert model.num_params() == cfg.num_params(VOCAB) == sum(p.numel() for p in unique) - rows
    assert len(model.shard_units()) == 4
    vocab, T = 256, 32  # no padding rows: the head's product is V·d
    model = cfg.build(vocab)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ids = torch.randint(0, vocab, (1, T))
        model(ids, torch.tensor([T]), ids).sum().backward()
    assert counter.get_total_flops() / T == pytest.approx(cfg.flops_per_token(vocab, T), rel=0.01)


def test_source_padding_is_read_by_nothing():
    torch.manual_seed(0)
    model = small().build(VOCAB).eval()
    src, lengths, tgt = batch()
    other = src.clone()
    other[torch.arange(10) >= lengths[:, None]] = 5  # other ids past the lengths
    with torch.no_grad():
        logits = model(src, lengths, tgt)
        assert torch.equal(model(other, lengths, tgt), logits)
        other[1, 0] = (src[1, 0] + 1) % VOCAB  # a real source id: it counts
        changed = model(other, lengths, tgt)
    assert not torch.allclose(changed[1], logits[1]) and torch.equal(changed[0], logits[0])


def test_the_decoder_reads_no_later_target():
    torch.manual_seed(0)
    model = small().build(VOCAB).eval()
    src, lengths, tgt = batch()
    later = tgt.clone()
    later[:, 5] = (tgt[:, 5] + 1) % VOCAB  # the input of position 5
    with torch.no_grad():
        a, b = model(src, lengths, tgt)[..., :VOCAB], model(src, lengths, later)[..., :VOCAB]
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert all(not torch.allclose(a[:, t], b[:, t]) for t in range(5, 8))


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=lambda v: ",".join(v) or "default")
def test_cached_decoding_equals_recomputation(variant):
    torch.manual_seed(1)
    model = small(**variant).build(VOCAB).eval()
    src, lengths, tgt = batch()
    with torch.no_grad():
        full = model(src, lengths, tgt)
        memory, cache = model.encode(src, lengths), model.new_cache()
        steps = torch.cat([model.decode(tgt[:, [t]], memory, cache) for t in range(8)], dim=1)
    assert len(cache) == 8 and all(kv is not None for kv in cache.cross)
    assert (steps[..., :VOCAB] - full[..., :VOCAB]).abs().max() < 1e-4
    # greedy through the cache: the argmax of a full forward pass at each step
    found = greedy(model, src, lengths, bos=0, eos=1, max_len=12)
    with torch.no_grad():
        for i, hypothesis in enumerate(found):
            ids = [0]
            for _ in range(12):
                ids.append(int(model(src[i:i + 1], lengths[i:i + 1],
                                     torch.tensor([ids]))[0, -1, :VOCAB].argmax()))
                if ids[-1] == 1:
                    break
            assert hypothesis.tokens == [t for t in ids[1:] if t != 1]


def test_a_reordered_cache_continues_as_the_reordered_batch():
    torch.manual_seed(2)
    model = small().build(VOCAB).eval()
    src, lengths, tgt = batch()
    order = torch.tensor([2, 2, 0, 3])
    with torch.no_grad():
        memory, cache = model.encode(src, lengths), model.new_cache()
        model.decode(tgt[:, :5], memory, cache)
        cache.select(order)
        continued = model.decode(tgt[order, 5:], memory.select(order), cache)
        full = model(src[order], lengths[order], tgt[order])
    assert (continued[..., :VOCAB] - full[:, 5:, :VOCAB]).abs().max() < 1e-4


def sequence_scores(model, src, lengths, hypotheses: list[list[int]], bos: int, eos: int,
                    ends: list[bool]) -> torch.Tensor:
    """Each hypothesis's sum of log-probabilities, read from one teacher-forced forward
    pass over [bos, tokens] (eos scored where `ends`)."""
    scores = []
    with torch.no_grad():
        for i, (tokens, end) in enumerate(zip(hypotheses, ends, strict=True)):
            target = [*tokens, eos] if end else tokens
            logits = model(src[i:i + 1], lengths[i:i + 1], torch.tensor([[bos, *target[:-1]]]))
            logp = F.log_softmax(logits[0, :, :model.vocab_size].float(), dim=-1)
            scores.append(float(logp[torch.arange(len(target)), target].sum()))
    return torch.tensor(scores)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_beam_search_is_exact_when_its_beam_holds_every_prefix(alpha):
    """5 ids, 3 steps: every hypothesis (eos at step 1, 2 or 3, or none) scored by the
    model; beam 20 keeps every prefix and every eos, so it must find the best by
    score / ((5 + length) / 6) ** alpha. (An untied head: a tied one echoes its input.)"""
    torch.manual_seed(2)
    vocab, bos, eos, steps = 5, 0, 1, 3
    model = small(tie_embeddings=False).build(vocab).eval()
    src, lengths, _ = batch(vocab)
    found = beam_search(model, src, lengths, bos, eos, beam=20, length_penalty=alpha,
                        max_len=steps)
    others = [t for t in range(vocab) if t != eos]
    candidates = [(list(p), True) for n in range(steps) for p in itertools.product(others, repeat=n)]
    candidates += [(list(p), False) for p in itertools.product(others, repeat=steps)]
    length = torch.tensor([len(c) + e for c, e in candidates], dtype=torch.float64)
    penalized = 0
    for i, hypothesis in enumerate(found):
        scores = sequence_scores(model, src[[i] * len(candidates)], lengths[[i] * len(candidates)],
                                 [c for c, _ in candidates], bos, eos, [e for _, e in candidates])
        best = int((scores / ((5 + length) / 6) ** alpha).argmax())
        assert hypothesis.tokens == candidates[best][0]
        assert hypothesis.score == pytest.approx(float(scores[best]), abs=1e-4)
        penalized += best != int(scores.argmax())
    assert penalized == 0 if alpha == 0 else penalized >= 2  # the penalty changed the choice


def test_beam_1_is_greedy_and_scores_are_the_models():
    torch.manual_seed(4)
    model = small().build(VOCAB).eval()
    src, lengths, _ = batch()
    limit = max_length(lengths, 1.0, 3, model.cfg.max_seq_len)  # 13, 7, 10, 4
    # a likely eos: the id the untrained model repeats (its tied embedding echoes its input)
    bos, eos = 0, int(model(src, lengths, torch.zeros(4, 1, dtype=torch.long))[0, 0, :VOCAB]
                      .argmax())
    first = greedy(model, src, lengths, bos, eos, limit)
    beam = beam_search(model, src, lengths, bos, eos, beam=1, length_penalty=0.0, max_len=limit)
    assert [h.tokens for h in beam] == [h.tokens for h in first]
    assert [h.score for h in beam] == pytest.approx([h.score for h in first], abs=1e-4)
    for h, n in zip(first, limit.tolist(), strict=True):
        assert len(h.tokens) <= n
    ends = [len(h.tokens) < n for h, n in zip(first, limit.tolist(), strict=True)]
    model_scores = sequence_scores(model, src, lengths, [h.tokens for h in first], bos, eos, ends)
    assert model_scores.tolist() == pytest.approx([h.score for h in first], abs=1e-4)


@contextmanager
def one_thread():
    """A tiny model trains faster on one thread (no thread pool's overhead per kernel)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


BOS, EOS, PAD, REVERSE_VOCAB = 0, 1, 2, 12


def reversal_pairs(g: torch.Generator, n: int):
    """n sources of 3..7 ids from 3..11, padded to 7; their targets the sources reversed
    then eos, padded to 8 (PAD ignored by the loss)."""
    lengths = torch.randint(3, 8, (n,), generator=g)
    src = torch.randint(3, REVERSE_VOCAB, (n, 7), generator=g)
    src = src.masked_fill(torch.arange(7) >= lengths[:, None], PAD)
    tgt = torch.full((n, 8), PAD)
    for i, length in enumerate(lengths.tolist()):
        tgt[i, :length] = src[i, :length].flip(0)
        tgt[i, length] = EOS
    return src, lengths, tgt


@pytest.fixture(scope="module")
def reverser():
    """A model trained 200 Adam steps to reverse its source: peaked distributions, as a
    real translation model's (2 s on one CPU thread)."""
    torch.manual_seed(0)
    model = Seq2SeqConfig(d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2,
                          d_ff=64, dropout=0.0, max_seq_len=16).build(REVERSE_VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with one_thread():
        for _ in range(200):
            src, lengths, tgt = reversal_pairs(g, 64)
            inputs = torch.cat((torch.full((64, 1), BOS), tgt[:, :-1]), dim=1)
            logits = model(src, lengths, inputs)[..., :REVERSE_VOCAB]
            loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_beam_4_scores_at_least_greedy_on_a_trained_model(reverser):
    src, lengths, tgt = reversal_pairs(torch.Generator().manual_seed(5), 32)
    with one_thread():
        first = greedy(reverser, src, lengths, BOS, EOS, 10)
        beam = beam_search(reverser, src, lengths, BOS, EOS, beam=4, length_penalty=0.0,
                           max_len=10)
    right = sum(h.tokens == tgt[i, :n].tolist() for i, (h, n) in enumerate(zip(first, lengths, strict=True)))
    assert right >= 16  # it learned the task: the distributions are peaked
    for g, b in zip(first, beam, strict=True):
        assert b.score >= g.score - 1e-5
    assert sum(b.score > g.score + 1e-3 for g, b in zip(first, beam, strict=True)) >= 1  # it searched
    ends = [True] * len(beam)  # every hypothesis ends with eos before 10 ids
    assert all(len(b.tokens) < 10 for b in beam)
    model_scores = sequence_scores(reverser, src, lengths, [b.tokens for b in beam], BOS, EOS,
                                   ends)
    assert model_scores.tolist() == pytest.approx([b.score for b in beam], abs=1e-4)


def test_max_length_is_fairseqs_capped_by_the_positions():
    lengths = torch.tensor([1, 10, 100])
    assert max_length(lengths, 1.2, 10, 64).tolist() == [11, 22, 64]
    assert max_length(lengths, 0.0, 0, 64).tolist() == [1, 1, 1]


def test_the_memory_selects_rows():
    memory = Memory(torch.arange(6.0).view(3, 2, 1), torch.tensor([[False, True]] * 3))
    assert memory.select(torch.tensor([2, 0])).states.flatten().tolist() == [4, 5, 0, 1]


@pytest.mark.parametrize("override,key", [
    ("model.n_heads=3", "model.n_heads"),
    ("model.positions=rotary", "model.positions"),
    ("model.activation=swiglu", "model.activation"),
    ("model.n_encoder_layers=0", "model.n_encoder_layers"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.init_from=somewhere", "model.init_from"),
])
def test_a_bad_key_is_one_line_naming_it(override, key):
    with pytest.raises(ConfigError) as error:
        model_config("model=transformer_tiny", override)
    assert error.value.key == key and "\n" not in str(error.value)
